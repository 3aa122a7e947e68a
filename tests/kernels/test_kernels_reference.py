"""The block-sparse contract: PyTorch reference vs dense attention with the equivalent explicit mask."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from diffusers_attn.kernels import (
    block_mask_to_lists,
    block_sparse_attention,
    block_sparse_attention_torch,
    lists_to_block_mask,
    lists_to_token_mask,
    masked_attention_reference,
    num_blocks,
)


def random_lists(B, H, n_q, n_k, bm, bn, density, gen, empty_rows=0):
    M, K = num_blocks(n_q, bm), num_blocks(n_k, bn)
    mask = torch.rand(B, H, M, K, generator=gen) < density
    if empty_rows:
        mask[0, 0, :empty_rows] = False
    return mask, *block_mask_to_lists(mask)


@pytest.mark.parametrize(
    "n_q,n_k,bm,bn,D",
    [(100, 100, 16, 16, 16), (77, 130, 32, 16, 32), (64, 64, 64, 32, 64), (45, 45, 8, 24, 8)],
)
@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
@pytest.mark.parametrize("impl", ["segments", "masked", "math"])
def test_matches_masked_dense(n_q, n_k, bm, bn, D, density, impl):
    gen = torch.Generator().manual_seed(n_q * 31 + bn)
    B, H = 2, 3
    q = torch.randn(B, H, n_q, D, generator=gen)
    k = torch.randn(B, H, n_k, D, generator=gen)
    v = torch.randn(B, H, n_k, D, generator=gen)
    _, idx, cnt = random_lists(B, H, n_q, n_k, bm, bn, density, gen, empty_rows=1)
    kpm = torch.rand(B, n_k, generator=gen) > 0.2
    out = block_sparse_attention_torch(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm, impl=impl)
    mask = lists_to_token_mask(idx, cnt, n_q, n_k, bm, bn) & kpm[:, None, None, :]
    ref = masked_attention_reference(q, k, v, mask)
    assert out.dtype == q.dtype and out.shape == (B, H, n_q, D)
    assert rel_err(out, ref) < 1e-5


def test_key_padding_tails_empty_rows_and_lse():
    gen = torch.Generator().manual_seed(0)
    B, H, n, D, bm, bn = 2, 2, 90, 16, 16, 16
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    _, idx, cnt = random_lists(B, H, n, n, bm, bn, 0.5, gen, empty_rows=2)
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[0, 70:] = False
    kpm[1, 5:9] = False
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm, return_lse=True)
    mask = lists_to_token_mask(idx, cnt, n, n, bm, bn) & kpm[:, None, None, :]
    ref = masked_attention_reference(q, k, v, mask)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-5
    # rows with no allowed key: zeros and lse = -inf
    empty = ~mask.any(-1)
    assert empty[0, 0, : 2 * bm].all()
    assert (out[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all()
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    ref_lse = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    ok = ~empty
    assert torch.allclose(lse[ok].double(), ref_lse[ok], atol=1e-5, rtol=1e-6)


def test_strided_views_and_broadcast_lists_and_scale():
    """BSHD tensors viewed as BHSD (no copies) and stride-0 broadcast block lists are accepted."""
    gen = torch.Generator().manual_seed(1)
    B, H, n, D = 2, 4, 70, 16
    q, k, v = (torch.randn(B, n, H, D, generator=gen).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    mask = torch.rand(num_blocks(n, 16), num_blocks(n, 32), generator=gen) < 0.5
    idx, cnt = block_mask_to_lists(mask)
    idx_b, cnt_b = idx.expand(B, H, *idx.shape), cnt.expand(B, H, *cnt.shape)
    out = block_sparse_attention(q, k, v, idx_b, cnt_b, block_m=16, block_n=32, scale=0.3)
    ref = masked_attention_reference(q, k, v, lists_to_token_mask(idx_b, cnt_b, n, n, 16, 32), scale=0.3)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    B, H, n, D = 1, 2, 64, 32
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(dtype) for _ in range(3))
    _, idx, cnt = random_lists(B, H, n, n, 16, 16, 0.5, gen)
    out = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    assert out.dtype == dtype
    ref = masked_attention_reference(q, k, v, lists_to_token_mask(idx, cnt, n, n, 16, 16))
    assert rel_err(out, ref) < tol


def test_chunking_does_not_change_results():
    gen = torch.Generator().manual_seed(3)
    B, H, n, D = 2, 3, 130, 16
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    _, idx, cnt = random_lists(B, H, n, n, 16, 16, 0.4, gen)
    a = block_sparse_attention_torch(q, k, v, idx, cnt, block_m=16, block_n=16, impl="math")
    b = block_sparse_attention_torch(q, k, v, idx, cnt, block_m=16, block_n=16, impl="math", chunk_bytes=1)
    c = block_sparse_attention_torch(q, k, v, idx, cnt, block_m=16, block_n=16, impl="segments")
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a, c, atol=1e-5)
    with pytest.raises(ValueError, match="log-sum-exp"):
        block_sparse_attention_torch(q, k, v, idx, cnt, block_m=16, block_n=16, impl="segments", return_lse=True)


def test_block_list_round_trip():
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 5, 7, generator=gen) < 0.4
    mask[0, 0] = False
    idx, cnt = block_mask_to_lists(mask)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert torch.equal(lists_to_block_mask(idx, cnt, 7), mask)
    assert torch.equal(cnt, mask.sum(-1).int())
    # ascending within the count
    for i in range(3):
        for j in range(5):
            row = idx[i, j, : cnt[i, j]].tolist()
            assert row == sorted(set(row))



def test_block_lists_with_a_given_width():
    """``k_max`` fixes the list width (narrower or wider than K), padding with the row's last listed block."""
    mask = torch.tensor([[True, False, True, False], [False, False, False, False], [False, True, False, False]])
    idx, cnt = block_mask_to_lists(mask, 6)
    assert idx.tolist() == [[0, 2, 2, 2, 2, 2], [0] * 6, [1] * 6] and cnt.tolist() == [2, 0, 1]
    idx2, cnt2 = block_mask_to_lists(mask, 2)
    assert idx2.tolist() == [[0, 2], [0, 0], [1, 1]] and torch.equal(cnt2, cnt)
    with pytest.raises(ValueError, match="more than k_max=1"):
        block_mask_to_lists(mask, 1)


def _args(B=1, H=1, n=32, D=8, bm=16, bn=16):
    q = torch.randn(B, H, n, D)
    idx, cnt = block_mask_to_lists(torch.ones(B, H, num_blocks(n, bm), num_blocks(n, bn), dtype=torch.bool))
    return q, q.clone(), q.clone(), idx, cnt


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "kv_indices": a["kv_indices"].long()}, "int32"),
        (lambda a: {**a, "kv_counts": a["kv_counts"][..., :1]}, "kv_counts must be"),
        (lambda a: {**a, "q": a["q"][..., :4]}, "head_dim"),
        (lambda a: {**a, "q": a["q"].double()}, "share one of"),
        (lambda a: {**a, "block_m": 0}, "positive"),
        (lambda a: {**a, "key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, "key_padding_mask"),
        (lambda a: {**a, "q": a["q"][0]}, "4-D"),
    ],
)
def test_validation_errors(mutate, match):
    q, k, v, idx, cnt = _args()
    a = dict(q=q, k=k, v=v, kv_indices=idx, kv_counts=cnt, block_m=16, block_n=16)
    a = mutate(a)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(
            a["q"], a["k"], a["v"], a["kv_indices"], a["kv_counts"], block_m=a["block_m"], block_n=a["block_n"],
            key_padding_mask=a.get("key_padding_mask"),
        )


def test_content_checks_and_backend_override(monkeypatch):
    q, k, v, idx, cnt = _args()
    bad = idx.clone()
    bad[..., 0, :] = torch.tensor([1, 0], dtype=torch.int32)  # descending
    monkeypatch.setenv("DIFFATTN_CHECKS", "1")
    with pytest.raises(ValueError, match="ascending"):
        block_sparse_attention(q, k, v, bad, cnt, block_m=16, block_n=16)
    monkeypatch.delenv("DIFFATTN_CHECKS")
    with pytest.raises(ValueError, match="unknown or unavailable"):
        block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, backend="nope")
    out = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, backend="torch")
    assert rel_err(out, masked_attention_reference(q, k, v, None)) < 1e-5


def _probe_oracle(q, k, block_n, kpm, scale, tw):
    """fp64 softmax of every probe row, summed per key block and weighted by token_weights."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    empty = torch.isneginf(s.amax(-1, keepdim=True))
    p = torch.softmax(torch.where(empty, torch.zeros_like(s), s), -1).masked_fill(empty, 0.0)
    N = k.shape[2]
    K = num_blocks(N, block_n)
    mass = torch.nn.functional.pad(p, (0, K * block_n - N)).unflatten(-1, (K, block_n)).sum(-1)
    return mass, p @ tw.double()


@pytest.mark.parametrize("n,bn,D", [(100, 16, 16), (77, 32, 8), (64, 64, 32)])
def test_probe_block_mass_torch_matches_oracle(n, bn, D):
    from diffusers_attn.kernels import probe_block_mass

    gen = torch.Generator().manual_seed(n + bn)
    B, H, P = 2, 3, 5
    q = torch.randn(B, H, P, D, generator=gen) * 2
    k = torch.randn(B, H, n, D, generator=gen) * 2
    kpm = torch.rand(B, n, generator=gen) > 0.3
    kpm[1] = False  # no valid key at all: zeros, never NaN
    tw = (torch.rand(n, generator=gen) > 0.5).float()
    mass, tmass = probe_block_mass(q, k, block_n=bn, key_padding_mask=kpm, scale=0.3, token_weights=tw,
                                   backend="torch")
    ref_mass, ref_t = _probe_oracle(q, k, bn, kpm, 0.3, tw)
    assert rel_err(mass[0], ref_mass[0]) < 1e-5 and rel_err(tmass[0], ref_t[0]) < 1e-5
    assert torch.allclose(mass[0].sum(-1), torch.ones(H, P), atol=1e-5)
    assert (mass[1] == 0).all() and (tmass[1] == 0).all()
    # strided (BSHD storage) inputs and no optional arguments
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    m2, t2 = probe_block_mass(q, kt, block_n=bn)
    assert t2 is None and rel_err(m2, _probe_oracle(q, k, bn, None, D**-0.5, tw)[0]) < 1e-5
    with pytest.raises(ValueError, match="token_weights"):
        probe_block_mass(q, k, block_n=bn, token_weights=tw[:-1])
    with pytest.raises(ValueError, match="probe backend"):
        probe_block_mass(q, k, block_n=bn, backend="cuda")
