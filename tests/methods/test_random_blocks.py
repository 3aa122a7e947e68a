"""The random-block baseline (RandomBlockMethod): exact vs dense attention under its executed mask, rf2's forced
regions, realized density vs the target, seeding."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import diffusers_attn.methods.rainfusion.random_blocks as rb
from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.kernels import lists_to_token_mask, masked_attention_reference
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import RainFusionConfig

SPARSE = {"sparsity": 0.5, "dense_steps": 0, "dense_layers": 0, "min_video_tokens": 0}


@pytest.fixture
def spy(monkeypatch):
    """The block lists every kernel call of the baseline executed, in call order."""
    calls = []
    kernel = rb.block_sparse_attention

    def wrapped(q, k, v, idx, cnt, **kw):
        calls.append((idx.clone(), cnt.clone()))
        return kernel(q, k, v, idx, cnt, **kw)

    monkeypatch.setattr(rb, "block_sparse_attention", wrapped)
    return calls


def _ctx():
    class _A:  # the method never touches the adapter
        pass

    return AttentionContext(_A())


def _qkv(B, H, N, D, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _run(method, ctx, q, k, v, layout, kpm=None, layer=0):
    return run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=layer,
                      context=ctx, dense_fn=lambda: pytest.fail("the dense path must not run"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout,bm,bn,pad", [
    (TokenLayout.text_first((5, 6, 8), 11), 16, 8, False),  # N = 251: no block size divides it
    (TokenLayout.video_first((4, 6, 8), 13), 16, 16, True),  # HunyuanVideo style, padded text in batch 1
])
def test_output_equals_dense_under_the_executed_mask(spy, dtype, layout, bm, bn, pad):
    B, H, D, N = 2, 3, 16, layout.seq_len
    q, k, v = _qkv(B, H, N, D, seed=bm + bn, dtype=dtype)
    kpm = None
    if pad:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[1, N - 9:] = False
    cfg = RainFusionConfig(block_m=bm, block_n=bn, **SPARSE)
    ctx = _ctx()
    out = _run(rb.RandomBlockMethod(cfg, target_density=0.4, seed=1), ctx, q, k, v, layout, kpm)
    (idx, cnt), = spy
    mask = lists_to_token_mask(idx, cnt, N, N, bm, bn)
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    assert not mask.all(), "the baseline must be sparse here"
    ref = masked_attention_reference(q, k, v, mask)
    assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else 1e-5)
    # forced regions as rf2 (first frame a sink): text rows and columns, first-frame keys
    t, _, _, txt = layout.token_coords()
    valid = kpm if kpm is not None else torch.ones(B, N, dtype=torch.bool)
    assert (mask[:, :, txt] == valid[:, None, None, :]).all()
    assert (mask[:, :, :, txt] == valid[:, None, None, txt]).all()
    assert mask[:, :, :, t == 0].all()
    # the record counts exactly the video pairs of that mask
    vid = t >= 0
    vmask = mask[:, :, vid][:, :, :, vid]
    assert ctx.stats.summary().video_density == pytest.approx(vmask.double().mean().item(), rel=1e-12)
    assert ctx.stats.summary().pattern_histogram["random"] == B * H


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_realized_density_is_within_one_block_per_row_of_the_target(spy, target):
    layout, bm, bn = TokenLayout.text_first((6, 8, 8), 8), 16, 16  # text shares block 0 with the first frame
    N, nv = layout.seq_len, layout.num_video
    B, H = 2, 4
    q, k, v = _qkv(B, H, N, 8, seed=0, dtype=torch.float32)
    method = rb.RandomBlockMethod(RainFusionConfig(block_m=bm, block_n=bn, **SPARSE), target_density=target)
    ctx = _ctx()
    _run(method, ctx, q, k, v, layout)
    (idx, cnt), = spy
    t, _, _, _ = layout.token_coords()
    vid = t >= 0
    mask = lists_to_token_mask(idx, cnt, N, N, bm, bn)[:, :, vid][:, :, :, vid]
    density = mask.double().mean((-1, -2))  # (B, H)
    plan = method.random_plan(layout)
    base = plan.base
    free = ~base.forced.all(1)
    one_block_per_row = float(base.vrows_pb[free].sum()) * float(base.vkeys_pb.max()) / nv**2
    assert (density - target).abs().max() <= one_block_per_row, (density, target)
    assert abs(plan.expected_density - target) <= one_block_per_row / 2
    # heads draw different blocks (target 0.2 is about the forced part alone); the record matches the mask
    sets = {tuple(idx[b, h].flatten().tolist()) for b in range(B) for h in range(H)}
    assert len(sets) == (B * H if target > 0.3 else 1) and bool(plan.counts.any()) == (target > 0.3)
    assert ctx.stats.summary().video_density == pytest.approx(density.mean().item(), rel=1e-12)
    dec = ctx.last_decisions[0]
    assert torch.allclose(torch.as_tensor(dec.density), density)


def test_a_target_below_the_forced_part_runs_the_forced_part_and_says_so(spy):
    layout = TokenLayout.video_first((6, 8, 8), 8)  # first frame = 4 whole key blocks: 1/6 of the video keys
    q, k, v = _qkv(1, 2, layout.seq_len, 8, seed=0, dtype=torch.float32)
    method, ctx = rb.RandomBlockMethod(RainFusionConfig(block_m=16, block_n=16, **SPARSE), target_density=0.1), _ctx()
    _run(method, ctx, q, k, v, layout)
    (idx, cnt), = spy
    mask = lists_to_token_mask(idx, cnt, layout.seq_len, layout.seq_len, 16, 16)
    t, _, _, _ = layout.token_coords()
    vid = t >= 0
    assert mask[:, :, vid][:, :, :, vid].double().mean().item() == pytest.approx(1 / 6, rel=1e-12)
    assert "above the target 0.100" in ctx.stats.summary().info["random_blocks_target_unmet"]


def test_seeded_draws_are_reproducible(spy):
    layout = TokenLayout.text_first((5, 8, 8), 8)
    q, k, v = _qkv(1, 2, layout.seq_len, 8, seed=0, dtype=torch.float32)
    cfg = RainFusionConfig(block_m=16, block_n=16, **SPARSE)
    for seed in (0, 0, 1):
        _run(rb.RandomBlockMethod(cfg, target_density=0.4, seed=seed), _ctx(), q, k, v, layout)
    _run(rb.RandomBlockMethod(cfg, target_density=0.4, seed=0), _ctx(), q, k, v, layout, layer=1)
    (a, _), (b, _), (c, _), (d, _) = spy
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_target_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="target_density must be in"):
        rb.RandomBlockMethod(RainFusionConfig(), target_density=0.0)
