"""The FlexAttention backend vs the PyTorch reference and dense fp64 attention (CPU: eager and compiled)."""

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

pytest.importorskip("torch.nn.attention.flex_attention")
fb = pytest.importorskip("diffusers_attn.kernels.flex_backend")


@pytest.fixture(autouse=True)
def _fresh_cache():
    fb.clear_cache()
    yield
    fb.clear_cache()


def make(B, H, n_q, n_k, D, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # BSHD storage viewed as BHSD, as the adapters pass it
        mk = lambda n: torch.randn(B, n, H, D, generator=g).transpose(1, 2)
    else:
        mk = lambda n: torch.randn(B, H, n, D, generator=g)
    return mk(n_q), mk(n_k), mk(n_k), g


def lists(g, B, H, n_q, n_k, bm, bn, density=0.5):
    mask = torch.rand(B, H, num_blocks(n_q, bm), num_blocks(n_k, bn), generator=g) < density
    mask[0, -1, 0] = False  # an empty row
    return block_mask_to_lists(mask)


def check(out, q, k, v, idx, cnt, n_q, n_k, bm, bn, kpm=None, tol=2e-6):
    tok = lists_to_token_mask(idx, cnt, n_q, n_k, bm, bn)
    if kpm is not None:
        tok = tok & kpm[:, None, None, :]
    exact = masked_attention_reference(q, k, v, tok)
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    assert rel_err(out, exact) < tol
    empty = ~tok.any(-1)
    assert (out[empty] == 0).all()
    return exact, empty


def test_flex_registered_between_triton_and_torch():
    names = available_backends()
    assert "flex" in names and names.index("flex") < names.index("torch")
    if "triton" in names:
        assert names.index("triton") < names.index("flex")
    q = torch.randn(1, 1, 32, 64)
    assert select_backend(q, q, q, 16, 16) == "torch"  # CPU: automatic selection never takes flex
    assert select_backend(q, q, q, 16, 16, "flex") == "flex"
    with pytest.raises(ValueError, match="multiples of 16"):
        select_backend(q, q, q, 16, 24, "flex")


@pytest.mark.parametrize(
    "n_q,n_k,D,bm,bn,padded",
    [
        (96, 96, 64, 32, 16, False),
        (77, 130, 64, 16, 32, True),  # tails, Nq != Nk, key padding
        (64, 80, 128, 32, 16, True),
        (40, 72, 128, 16, 16, False),
    ],
)
def test_eager_matches_reference(n_q, n_k, D, bm, bn, padded, monkeypatch):
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "0")
    B, H = 2, 2
    q, k, v, g = make(B, H, n_q, n_k, D, seed=n_q + D)
    idx, cnt = lists(g, B, H, n_q, n_k, bm, bn)
    kpm = None
    if padded:
        kpm = torch.ones(B, n_k, dtype=torch.bool)
        kpm[0, n_k - 7 :] = False  # padded text tail, straddling a block
        kpm[1, n_k - bn - 3 :] = False  # a fully padded block plus a straddling one
    out, lse = block_sparse_attention(
        q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm, return_lse=True, backend="flex"
    )
    _, empty = check(out, q, k, v, idx, cnt, n_q, n_k, bm, bn, kpm)
    assert empty.any()
    _, ref_lse = block_sparse_attention(
        q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm, return_lse=True, backend="torch"
    )
    assert torch.isneginf(lse[empty]).all()
    assert torch.allclose(lse[~empty], ref_lse[~empty], atol=1e-5)


def test_block_mask_full_and_partial_blocks():
    """Full blocks carry no padding; partial blocks are exactly the listed ones straddling it; padded-only ones go."""
    n_q, n_k, bm, bn = 32, 64, 16, 16
    idx = torch.tensor([[0, 1, 2, 3], [1, 3, 3, 3]], dtype=torch.int32).expand(2, 1, 2, 4)
    cnt = torch.tensor([4, 2], dtype=torch.int32).expand(2, 1, 2)
    kpm = torch.ones(2, n_k, dtype=torch.bool)
    kpm[0, 40:] = False  # block 2 straddles, block 3 fully padded
    bmask = fb.build_block_mask(idx, cnt, n_q, n_k, bm, bn, kpm)
    full = [
        bmask.full_kv_indices[b, 0, m, : bmask.full_kv_num_blocks[b, 0, m]].tolist() for b in range(2) for m in range(2)
    ]
    part = [bmask.kv_indices[b, 0, m, : bmask.kv_num_blocks[b, 0, m]].tolist() for b in range(2) for m in range(2)]
    assert full == [[0, 1], [1], [0, 1, 2, 3], [1, 3]]
    assert part == [[2], [], [], []]
    assert bmask.BLOCK_SIZE == (bm, bn) and fb.build_block_mask(idx, cnt, n_q, n_k, bm, bn, kpm) is bmask


def test_cache_keyed_on_list_identity_and_version():
    g = torch.Generator().manual_seed(0)
    idx, cnt = lists(g, 1, 2, 64, 64, 16, 16)
    a = fb.build_block_mask(idx, cnt, 64, 64, 16, 16)
    assert fb.build_block_mask(idx, cnt, 64, 64, 16, 16) is a  # same plan: cached
    cnt[0, 0, 0] = 0  # in-place edit bumps the version: rebuilt
    b = fb.build_block_mask(idx, cnt, 64, 64, 16, 16)
    assert b is not a and int(b.full_kv_num_blocks[0, 0, 0]) == 0
    assert fb.build_block_mask(idx.clone(), cnt, 64, 64, 16, 16) is not b  # another tensor: rebuilt
    with torch.inference_mode():  # no version counter on inference tensors: still cached by identity
        i2, c2 = idx.clone(), cnt.clone()
        assert fb.build_block_mask(i2, c2, 64, 64, 16, 16) is fb.build_block_mask(i2, c2, 64, 64, 16, 16)


def test_broadcast_lists_strided_and_table(monkeypatch):
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "0")
    B, H, n, D, bm, bn = 2, 3, 80, 64, 16, 16
    q, k, v, g = make(B, H, n, n, D, seed=3, strided=True)
    assert not q.is_contiguous()
    table = torch.rand(3, num_blocks(n, bm), num_blocks(n, bn), generator=g) < 0.4
    t_idx, t_cnt = block_mask_to_lists(table)
    head_table = torch.tensor([[0, 1, 2], [2, 2, 0]], dtype=torch.int32)
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[1, 70:] = False
    out = block_sparse_attention_table(
        q, k, v, t_idx, t_cnt, head_table, block_m=bm, block_n=bn, key_padding_mask=kpm, scale=0.2, backend="flex"
    )
    ref = block_sparse_attention_table(
        q, k, v, t_idx, t_cnt, head_table, block_m=bm, block_n=bn, key_padding_mask=kpm, scale=0.2, backend="torch"
    )
    assert rel_err(out, ref) < 2e-6
    # one pattern broadcast over every (b, h), as RainFusion passes it
    i, c = t_idx[1].expand(B, H, *t_idx.shape[1:]), t_cnt[1].expand(B, H, t_cnt.shape[1])
    out = block_sparse_attention(q, k, v, i, c, block_m=bm, block_n=bn, backend="flex")
    check(out, q, k, v, i, c, n, n, bm, bn)


def test_kernel_options_divide_list_blocks():
    cuda = torch.device("cuda")
    assert fb.kernel_options(128, 64, cuda) == {"BLOCK_M": 128, "BLOCK_N": 64}  # CogVideoX head_dim 64 lists
    assert fb.kernel_options(128, 128, cuda) == {"BLOCK_M": 128, "BLOCK_N": 128}
    assert fb.kernel_options(96, 48, cuda) == {"BLOCK_M": 32, "BLOCK_N": 16}
    assert fb.kernel_options(128, 64, torch.device("cpu")) is None


def test_compile_mode_env(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DIFFATTN_FLEX_COMPILE", raising=False)
    assert not fb.compile_mode(cpu) and fb.compile_mode(cuda)
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "1")
    assert fb.compile_mode(cpu)
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "0")
    assert not fb.compile_mode(cuda)
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "yes")
    with pytest.raises(ValueError, match="'auto', '0' or '1'"):
        fb.compile_mode(cpu)


@pytest.mark.parametrize("D,padded", [(64, True), (128, False)])
def test_compiled_matches_reference(D, padded, monkeypatch):
    """The fused (compiled) kernel evaluates mask_mod on partial blocks only: full/partial lists must be right."""
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "1")
    B, H, n_q, n_k, bm, bn = 2, 2, 64, 96, 32, 16
    q, k, v, g = make(B, H, n_q, n_k, D, seed=11 + D)
    idx, cnt = lists(g, B, H, n_q, n_k, bm, bn)
    kpm = None
    if padded:
        kpm = torch.ones(B, n_k, dtype=torch.bool)
        kpm[1, 85:] = False
    out = block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm, backend="flex")
    _, empty = check(out, q, k, v, idx, cnt, n_q, n_k, bm, bn, kpm, tol=1e-5)
    assert empty.any()


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_inside_torch_compile(mode, monkeypatch):
    """Inside a compiled graph (the custom op) eager Flex cannot run (no vmap): compiled Flex runs there, and with
    compilation off the call takes the exact PyTorch reference instead of failing."""
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", mode)
    q, k, v, g = make(1, 2, 80, 80, 32, seed=5)
    idx, cnt = lists(g, 1, 2, 80, 80, 16, 16)
    kpm = torch.ones(1, 80, dtype=torch.bool)
    kpm[0, 70:] = False

    def f(q, k, v):
        return block_sparse_attention(
            q * 1.0, k, v, idx, cnt, block_m=16, block_n=16, key_padding_mask=kpm, backend="flex"
        )

    with torch.no_grad():
        out = torch.compile(f, fullgraph=True)(q, k, v)
    check(out, q, k, v, idx, cnt, 80, 80, 16, 16, kpm, tol=1e-5)
