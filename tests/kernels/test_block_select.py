"""block_topk_select: the Triton kernels (TRITON_INTERPRET=1 on CPU) against the PyTorch reference, and the
reference against the definition (pooled scores, forced blocks, top-k with ties to the lower block index)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_attn.kernels import available_backends, block_topk_select, key_blocks, lists_to_block_mask, num_blocks
from diffusers_attn.kernels.registry import SELECT

# Stats: columns 0, 1, 3 are integer counts times integer weights (exact on both paths); column 2, the kept softmax
# mass, is an fp32 softmax summed in a different order: relative error below this.
KEPT_TOL = 1e-5


def _triton():
    pytest.importorskip("triton")
    if "triton" not in available_backends(SELECT):
        pytest.skip("triton selection backend not registered")


def _problem(seed, B, H, n, D, bm, bn, dtype, pad, ternary=False):
    g = torch.Generator().manual_seed(seed)

    def mk():  # BSHD storage viewed as BHSD (the adapters' layout): the kernels must honour strides
        x = torch.randint(-1, 2, (B, n, H, D), generator=g).float() if ternary else torch.randn(B, n, H, D, generator=g)
        return x.to(dtype).transpose(1, 2)

    q, k = mk(), mk()
    M, K = num_blocks(n, bm), num_blocks(n, bn)
    kpm = None
    if pad:
        kpm = torch.ones(B, n, dtype=torch.bool)
        kpm[B - 1, n - bn // 2 - 3 :] = False  # a tail straddling a block
        if pad == 2:
            kpm[0, bn : 2 * bn] = False  # a fully padded key block
    forced = torch.zeros(M, K, dtype=torch.bool)
    forced[:, 0] = True  # a dense column (text keys) and a dense row (text queries)
    forced[M // 2] = True
    rw = torch.randint(1, 9, (M, 3), generator=g).double()
    cw = torch.randint(0, 9, (K,), generator=g).float()
    return q, k, kpm, forced, rw, cw


def _both(q, k, kpm, forced, rw, cw, **kw):
    out = {}
    for name in ("torch", "triton"):
        out[name] = block_topk_select(q, k, forced, key_padding_mask=kpm, row_weights=rw, col_weights=cw,
                                      backend=name, **kw)
    return out["triton"], out["torch"]


def _assert_same(got, want):
    (idx, cnt, stats), (ridx, rcnt, rstats) = got, want
    assert idx.dtype == cnt.dtype == torch.int32 and stats.dtype == torch.float64
    assert torch.equal(cnt, rcnt), (cnt != rcnt).nonzero()[:5]
    assert torch.equal(idx, ridx), (idx != ridx).any(-1).nonzero()[:5]
    assert torch.equal(stats[..., [0, 1, 3]], rstats[..., [0, 1, 3]])
    assert rel_err(stats[..., 2], rstats[..., 2]) < KEPT_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 1, 2])
def test_triton_equals_reference_on_random_inputs(dtype, pad):
    """Fresh Gaussian inputs, N a multiple of neither block size, forced rows and columns, key padding (none, a
    straddling tail, plus a fully padded block); top-k of 0, 3 and every block (rows with fewer candidates)."""
    _triton()
    B, H, n, D, bm, bn = 2, 2, 150, 24, 16, 8  # M = 10 (tail 6), K = 19 (tail 6), head_dim not a power of two
    q, k, kpm, forced, rw, cw = _problem(pad * 10 + 1, B, H, n, D, bm, bn, dtype, pad)
    K = num_blocks(n, bn)
    for topk in (0, 3, K):
        got, want = _both(q, k, kpm, forced, rw, cw, block_m=bm, block_n=bn, topk=topk, k_max=K)
        _assert_same(got, want)
    if pad == 2:  # the fully padded block is never listed, even where forced
        mask = lists_to_block_mask(got[0], got[1], K)
        assert mask[0, :, :, 0].all() and not mask[0, :, :, 1].any() and mask[1, :, :, 1].any()


def test_triton_equals_reference_with_tied_scores():
    """Ternary inputs (exact fp32 arithmetic) and repeated key blocks: many equal scores at the top-k threshold,
    where both must take the lower block index."""
    _triton()
    B, H, n, D, bm, bn = 2, 2, 136, 16, 16, 8  # tails of 8 queries, K = 17 full blocks
    q, k, kpm, forced, rw, cw = _problem(5, B, H, n, D, bm, bn, torch.float32, 0, ternary=True)
    k[:, :, 4 * bn : 12 * bn] = k[:, :, 4 * bn : 5 * bn].repeat(1, 1, 8, 1)  # blocks 4..11 identical
    K = num_blocks(n, bn)
    got, want = _both(q, k, kpm, forced, rw, cw, block_m=bm, block_n=bn, topk=4, k_max=K)
    _assert_same(got, want)
    # the rule itself: a row that lists some of the identical blocks 4..11 lists the lowest ones
    mask = lists_to_block_mask(got[0], got[1], K)[..., 4:12]
    n_tied = mask.sum(-1, keepdim=True)
    assert ((n_tied > 0) & (n_tied < 8)).any(), "no row split the tied blocks"
    assert torch.equal(mask, torch.arange(8) < n_tied)


def test_reference_follows_the_definition():
    """The reference against a per-row transcription of the module docstring (fp64)."""
    B, H, n, D, bm, bn = 1, 2, 70, 8, 16, 8
    q, k, kpm, forced, rw, cw = _problem(3, B, H, n, D, bm, bn, torch.float64, 2)
    M, K = num_blocks(n, bm), num_blocks(n, bn)
    idx, cnt, stats = block_topk_select(q, k, forced, block_m=bm, block_n=bn, topk=3, k_max=K,
                                        key_padding_mask=kpm, row_weights=rw, col_weights=cw, backend="torch")
    want = torch.zeros(B, H, 4, dtype=torch.float64)
    for b in range(B):
        valid = torch.tensor([int(kpm[b, j * bn : (j + 1) * bn].sum()) for j in range(K)], dtype=torch.float64)
        for h in range(H):
            kh = torch.stack([(k[b, h, j * bn : (j + 1) * bn] * kpm[b, j * bn : (j + 1) * bn, None]).sum(0)
                              / max(valid[j], 1) for j in range(K)])
            for i in range(M):
                qh = q[b, h, i * bm : (i + 1) * bm].mean(0)
                s = kh @ qh * D**-0.5 + valid.log()
                free = [j for j in range(K) if not forced[i, j] and valid[j] > 0]
                top = sorted(free, key=lambda j: (-float(s[j]), j))[:3]
                listed = sorted({j for j in range(K) if forced[i, j] and valid[j] > 0} | set(top))
                assert int(cnt[b, h, i]) == len(listed)
                assert idx[b, h, i].tolist() == listed + [listed[-1]] * (K - len(listed))
                p = s.softmax(0)
                want[b, h, 0] += rw[i, 0] * valid[listed].sum()
                want[b, h, 1] += rw[i, 1] * cw[listed].double().sum()
                want[b, h, 2] += rw[i, 2] * p[listed].sum()
        want[b, :, 3] = valid.sum()
    assert rel_err(stats, want) < 1e-12


def test_reused_key_blocks_and_validation():
    B, H, n, D = 1, 2, 40, 8
    q = torch.randn(B, H, n, D)
    forced = torch.zeros(3, 5, dtype=torch.bool)
    keys = key_blocks(n, 8, None, q.device)
    a = block_topk_select(q, q, forced, block_m=16, block_n=8, topk=2, k_max=5, keys=keys, backend="torch")
    b = block_topk_select(q, q, forced, block_m=16, block_n=8, topk=2, k_max=5, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=r"k_max must be an int in \[1, 5\]"):
        block_topk_select(q, q, forced, block_m=16, block_n=8, topk=2, k_max=6)
    with pytest.raises(ValueError, match=r"forced must be bool or uint8 \(M, K\) = \(3, 5\)"):
        block_topk_select(q, q, forced[:, :4], block_m=16, block_n=8, topk=2, k_max=5)
    with pytest.raises(ValueError, match="topk must be an int >= 0"):
        block_topk_select(q, q, forced, block_m=16, block_n=8, topk=-1, k_max=5)
    with pytest.raises(ValueError, match="more than k_max=1"):
        block_topk_select(q, q, forced, block_m=16, block_n=8, topk=2, k_max=1, backend="torch")


def test_triton_equals_reference_with_fewer_queries_than_keys():
    """Cross-attention shapes: M from the queries, K from the keys (a short last block on each side)."""
    _triton()
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 40, 16, generator=g)
    k = torch.randn(1, 2, 70, 16, generator=g)
    M, K = num_blocks(40, 16), num_blocks(70, 8)
    forced = torch.zeros(M, K, dtype=torch.uint8)
    forced[:, K - 1] = 1
    got, want = _both(q, k, None, forced, torch.ones(M, 3, dtype=torch.float64), torch.ones(K),
                      block_m=16, block_n=8, topk=3, k_max=4)
    _assert_same(got, want)
    assert (got[1] == 4).all()
