"""Triton block-sparse kernel vs the PyTorch reference (interpreter on CPU; the GPU check script covers bf16)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_attn.kernels import (
    available_backends,
    block_mask_to_lists,
    block_sparse_attention,
    block_sparse_attention_table,
    lists_to_token_mask,
    masked_attention_reference,
    num_blocks,
    select_backend,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and "triton" not in available_backends(), reason="triton backend not registered"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make(B, H, n_q, n_k, D, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # BSHD storage viewed as BHSD, as the adapters pass it
        mk = lambda n: torch.randn(B, n, H, D, generator=g).to(DEV, dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda n: torch.randn(B, H, n, D, generator=g).to(DEV, dtype)  # noqa: E731
    return mk(n_q), mk(n_k), mk(n_k), g


@pytest.mark.parametrize(
    "n_q,n_k,D,bm,bn,dtype",
    [
        (96, 96, 64, 32, 16, torch.float32),  # two kernel tiles per list block
        (77, 130, 64, 16, 32, torch.float16),  # tails, Nq != Nk, two key sub-tiles per list block
        (64, 80, 128, 16, 16, torch.float16),
        (50, 50, 72, 16, 16, torch.float32),  # head_dim padded to 128 in registers
        (48, 48, 96, 32, 32, torch.float16),
    ],
)
def test_kernel_matches_reference(n_q, n_k, D, bm, bn, dtype):
    B, H = 2, 2
    q, k, v, g = make(B, H, n_q, n_k, D, dtype, seed=n_q + D)
    mask = torch.rand(B, H, num_blocks(n_q, bm), num_blocks(n_k, bn), generator=g) < 0.5
    mask[0, 1, 0] = False  # an empty row
    idx, cnt = (t.to(DEV) for t in block_mask_to_lists(mask))
    kpm = torch.rand(B, n_k, generator=g) > 0.25
    kpm[1, :bn] = False  # a fully padded first key block: the online softmax must not produce NaN
    kpm = kpm.to(DEV)
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm,
                                      return_lse=True, backend="triton")
    ref, ref_lse = block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm,
                                          return_lse=True, backend="torch")
    assert out.dtype == dtype and not torch.isnan(out).any()
    tok = lists_to_token_mask(idx.cpu(), cnt.cpu(), n_q, n_k, bm, bn) & kpm.cpu()[:, None, None, :]
    exact = masked_attention_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), tok)
    assert rel_err(out.cpu(), exact) < TOL[dtype]
    # FlashAttention rule: no worse than 2x the same-dtype reference implementation (plus an fp32 floor)
    assert (out.cpu().double() - exact).abs().max() <= 2 * (ref.cpu().double() - exact).abs().max() + 1e-5
    empty = ~tok.any(-1)
    assert empty[0, 1, :bm].all() and (out.cpu()[empty] == 0).all() and torch.isneginf(lse.cpu()[empty]).all()
    ok = ~empty
    assert torch.allclose(lse.cpu()[ok], ref_lse.cpu()[ok], atol=1e-3 if dtype == torch.float16 else 1e-5)


def test_strided_views_broadcast_lists_and_scale():
    q, k, v, g = make(1, 3, 64, 64, 64, torch.float32, seed=7, strided=True)
    assert not q.is_contiguous()
    mask = torch.rand(num_blocks(64, 16), num_blocks(64, 16), generator=g) < 0.4
    idx, cnt = (t.to(DEV) for t in block_mask_to_lists(mask))
    idx_b, cnt_b = idx.expand(1, 3, *idx.shape), cnt.expand(1, 3, *cnt.shape)
    out = block_sparse_attention(q, k, v, idx_b, cnt_b, block_m=16, block_n=16, scale=0.2, backend="triton")
    ref = block_sparse_attention(q, k, v, idx_b, cnt_b, block_m=16, block_n=16, scale=0.2, backend="torch")
    assert rel_err(out.cpu(), ref.cpu()) < 1e-5


def test_compact_table_path_matches_expanded_lists():
    """Per-pattern tables + head_table (how RainFusion launches all heads at once) equal per-head lists."""
    B, H, n, D, bm, bn = 2, 3, 80, 64, 16, 16
    q, k, v, g = make(B, H, n, n, D, torch.float16, seed=11)
    P = 3
    masks = torch.rand(P, num_blocks(n, bm), num_blocks(n, bn), generator=g) < torch.tensor([1.0, 0.5, 0.2])[:, None, None]
    t_idx, t_cnt = (t.to(DEV) for t in block_mask_to_lists(masks))
    head_table = torch.tensor([[0, 1, 2], [2, 2, 1]], dtype=torch.int32, device=DEV)
    kpm = torch.ones(B, n, dtype=torch.bool, device=DEV)
    kpm[1, -9:] = False
    out = block_sparse_attention_table(q, k, v, t_idx, t_cnt, head_table, block_m=bm, block_n=bn,
                                       key_padding_mask=kpm, backend="triton")
    ref = block_sparse_attention_table(q, k, v, t_idx, t_cnt, head_table, block_m=bm, block_n=bn,
                                       key_padding_mask=kpm, backend="torch")
    assert rel_err(out.cpu(), ref.cpu()) < TOL[torch.float16]
    with pytest.raises(ValueError, match="head_table must be int32"):
        block_sparse_attention_table(q, k, v, t_idx, t_cnt, head_table.long(), block_m=bm, block_n=bn)


def test_dispatch_rules():
    from diffusers_attn.kernels import fast_kernel_unavailable

    q = torch.randn(1, 1, 32, 16)
    assert fast_kernel_unavailable(q, q, q, 16, 16) is None  # interpreter: the kernel could run this
    big = torch.randn(1, 1, 32, 320)
    assert "head_dim 320" in fast_kernel_unavailable(big, big, big, 16, 16)
    assert "multiples of 16" in fast_kernel_unavailable(q, q, q, 16, 24)
    # automatic selection never takes the kernel for CPU tensors, even under the interpreter
    assert select_backend(q, q, q, 16, 16) == "torch"
    idx, cnt = block_mask_to_lists(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiples of 16"):
        block_sparse_attention(q, q, q, idx, cnt, block_m=16, block_n=24, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q.double(), q.double(), q.double(), idx, cnt, block_m=16, block_n=16,
                               backend="triton")


@pytest.mark.parametrize("n,bn,D,dtype", [(150, 16, 64, torch.float32), (97, 32, 128, torch.float16),
                                          (80, 16, 72, torch.float16)])
def test_probe_kernel_matches_reference(n, bn, D, dtype):
    """The ARM probe kernel (two passes, block masses + token mass) equals the PyTorch path."""
    from diffusers_attn.kernels import probe_block_mass

    B, H, P = 2, 2, 21  # P not a multiple of the probe tile
    q, k, _, g = make(B, H, P, n, D, dtype, seed=n + D, strided=True)
    kpm = (torch.rand(B, n, generator=g) > 0.3).to(DEV)
    kpm[1, :bn] = False  # a fully padded first key block
    tw = (torch.rand(n, generator=g) > 0.5).float().to(DEV)
    got, got_t = probe_block_mass(q, k, block_n=bn, key_padding_mask=kpm, token_weights=tw, backend="triton")
    ref, ref_t = probe_block_mass(q, k, block_n=bn, key_padding_mask=kpm, token_weights=tw, backend="torch")
    assert not torch.isnan(got).any() and got.shape == ref.shape
    assert rel_err(got.cpu(), ref.cpu()) < TOL[dtype] and rel_err(got_t.cpu(), ref_t.cpu()) < TOL[dtype]
    got2, none = probe_block_mass(q, k, block_n=bn, backend="triton")
    assert none is None and rel_err(got2.cpu(), probe_block_mass(q, k, block_n=bn, backend="torch")[0].cpu()) < TOL[dtype]
