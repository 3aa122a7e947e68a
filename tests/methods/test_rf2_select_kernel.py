"""rf2 on the Triton selection path (``block_topk_select``, TRITON_INTERPRET=1 on CPU) against rf2's PyTorch path:
identical block lists and counts, equal pair statistics, the kept-mass estimate within fp32 rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.kernels import available_backends, lists_to_block_mask
from diffusers_attn.kernels.registry import SELECT
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod, rf2

SPARSE = {"mode": "rf2", "dense_steps": 0, "dense_layers": 0, "min_video_tokens": 0}
# The kept mass is a softmax over key blocks summed in fp32 in another order (and weighted by video rows / N_video
# instead of divided by it after the sum): relative error below this. The pair counts are exact on both paths.
KEPT_TOL = 1e-5


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")
    if "triton" not in available_backends(SELECT):
        pytest.skip("triton selection backend not registered")


def _inputs(layout, B, H, D, seed, dtype, pad, bn, ternary=False):
    g = torch.Generator().manual_seed(seed)
    N = layout.seq_len

    def mk():
        x = torch.randint(-1, 2, (B, N, H, D), generator=g).float() if ternary else torch.randn(B, N, H, D, generator=g)
        return x.to(dtype).transpose(1, 2)  # BSHD viewed as BHSD

    q, k = mk(), mk()
    kpm = None
    if pad:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[B - 1, N - 9 :] = False
        if pad == 2:
            kpm[0, N - 3 * bn - 5 :] = False  # fully padded key blocks in batch 0
    return q, k, kpm


def _select(backend, layout, bm, bn, sparsity, first_frame, q, k, kpm):
    cfg = RainFusionConfig(sparsity=sparsity, block_m=bm, block_n=bn, rf2_first_frame=first_frame,
                           kernel_backend=backend, **SPARSE)
    att = rf2.RF2Attention.of(RainFusionMethod(cfg))
    plan = att.plan(layout)
    c = plan.call_constants(q.device, q.shape[0], q.shape[1], torch.float32)
    for _ in range(2):  # the second call reuses the cached key constants
        (idx, cnt), stats = att._select_lists(q, k, plan, c, kpm, None)
    return idx, cnt, stats, plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("first_frame,sparsity", [("sink", 0.6), ("dense", 0.5), ("sink", 0.99)])
@pytest.mark.parametrize("layout,bm,bn,pad", [
    (TokenLayout.text_first((5, 7, 9), 11), 16, 8, 0),  # no block size divides N = 326
    (TokenLayout.video_first((6, 6, 10), 13), 24, 16, 1),  # padded text keys in batch 1
    (TokenLayout.video_first((4, 6, 8), 24), 16, 8, 2),  # fully padded key blocks in batch 0
])
def test_triton_selection_equals_the_torch_path(dtype, first_frame, sparsity, layout, bm, bn, pad):
    q, k, kpm = _inputs(layout, 2, 2, 16, bm + bn + pad, dtype, pad, bn)
    idx, cnt, stats, plan = _select("triton", layout, bm, bn, sparsity, first_frame, q, k, kpm)
    ridx, rcnt, rstats, _ = _select("torch", layout, bm, bn, sparsity, first_frame, q, k, kpm)
    assert sparsity < 0.99 or plan.blocks_per_row == 0  # sigma 0.99: the forced part only (k = 0)
    assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)
    assert stats.dtype == torch.float64 and torch.equal(stats[..., [0, 1, 3]], rstats[..., [0, 1, 3]])
    assert rel_err(stats[..., 2], rstats[..., 2]) < KEPT_TOL


def test_triton_selection_breaks_ties_like_the_torch_path():
    """Ternary q/k, N a multiple of both block sizes: every score is exact, so equal scores are equal on both paths
    and the documented rule (lower block index first) decides."""
    layout = TokenLayout.text_first((4, 8, 8), 64)
    q, k, _ = _inputs(layout, 2, 2, 16, 7, torch.float32, 0, 32, ternary=True)
    k[:, :, 64:192] = k[:, :, 64:96].repeat(1, 1, 4, 1)  # key blocks 2..5 of 32 identical
    idx, cnt, stats, plan = _select("triton", layout, 32, 32, 0.6, "none", q, k, None)
    ridx, rcnt, rstats, _ = _select("torch", layout, 32, 32, 0.6, "none", q, k, None)
    assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)
    assert torch.equal(stats[..., [0, 1, 3]], rstats[..., [0, 1, 3]])
    tied = lists_to_block_mask(idx, cnt, plan.num_k)[..., 2:6]
    n = tied.sum(-1, keepdim=True)
    assert ((n > 0) & (n < 4)).any(), "no row split the tied blocks"
    assert torch.equal(tied, torch.arange(4) < n)


def test_layer_call_on_the_triton_path_matches_the_torch_path(monkeypatch):
    """A whole layer call (selection and attention) with kernel_backend="triton": the executed lists, the output
    and the record's statistics equal those of kernel_backend="torch"."""
    layout = TokenLayout.video_first((4, 6, 8), 24)
    B, H, D, bn = 2, 2, 16, 16
    q, k, kpm = _inputs(layout, B, H, D, 3, torch.float32, 1, bn)
    v = torch.randn(B, H, layout.seq_len, D)
    runs = {}
    for backend in ("torch", "triton"):
        calls = []
        kernel = rf2.block_sparse_attention

        def spy(q, k, v, idx, cnt, _calls=calls, _kernel=kernel, **kw):
            _calls.append((idx.clone(), cnt.clone(), kw["backend"]))
            return _kernel(q, k, v, idx, cnt, **kw)

        monkeypatch.setattr(rf2, "block_sparse_attention", spy)
        cfg = RainFusionConfig(sparsity=0.6, block_m=16, block_n=bn, kernel_backend=backend, **SPARSE)
        ctx = AttentionContext(adapter=None)
        out = run_method(RainFusionMethod(cfg), q, k, v, layout=layout, key_padding_mask=kpm, layer_index=0,
                         context=ctx, dense_fn=lambda: pytest.fail("the dense path must not run"))
        monkeypatch.setattr(rf2, "block_sparse_attention", kernel)
        runs[backend] = (out, calls, ctx.stats.summary())
    (out, (call,), s), (rout, (rcall,), rs) = runs["triton"], runs["torch"]
    assert call[2] == "triton" and rcall[2] == "torch"
    assert torch.equal(call[0], rcall[0]) and torch.equal(call[1], rcall[1])
    assert rel_err(out, rout) < 1e-5
    assert s.density == rs.density and s.video_density == rs.video_density
