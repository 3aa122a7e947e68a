"""RainFusion's ARM recognizer: probe placement, the decision rule, planted heads of several strengths against an
exact oracle, probe cost, and autograd (ARM builds no graph; gradients through the sparse path are exact)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import (
    DENSE,
    SPATIAL,
    TEMPORAL,
    TEXTURAL,
    RainFusionConfig,
    RainFusionMethod,
    RainFusionPlan,
    choose_patterns,
    pattern_params,
)
from diffusers_attn.methods.rainfusion.recognition import grid_to_index, probe_rows
from diffusers_attn.testing import planted_qkv

KIND = {"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}


def _ctx():
    class _A:  # the method never touches the adapter
        pass

    return AttentionContext(_A())


def _thw(layout: TokenLayout, rows: torch.Tensor):
    t, h, w, _ = layout.token_coords()
    return t[rows], h[rows], w[rows]


# --------------------------------------------------------------------------- probe placement
def test_probe_rows_spread_over_frames_rows_and_columns():
    """CogVideoX-5B 480p: 72 probes. An index stride of |S| / 72 = 225 = 5 W put them all in one column at 6
    (h, w) positions; the low-discrepancy set covers every frame and most rows and columns."""
    layout = TokenLayout.text_first((13, 30, 45), 226)
    rows = probe_rows(layout, 72)
    s0, s1 = layout.sparse_rows
    assert rows.dtype == torch.long and rows.numel() == 72 == rows.unique().numel()
    assert ((rows >= s0) & (rows < s1)).all() and bool((rows.diff() > 0).all())
    t, h, w = _thw(layout, rows)
    assert t.unique().numel() == 12 and torch.bincount(t - 1).tolist() == [6] * 12  # equal share per frame
    assert h.unique().numel() == 30 and w.unique().numel() >= 30
    assert (h * layout.width + w).unique().numel() == 72
    assert torch.equal(rows, probe_rows(layout, 72))  # deterministic


@pytest.mark.parametrize("layout", [TokenLayout.text_first((3, 4, 5), 7), TokenLayout.video_first((4, 3, 3), 5)])
def test_probe_rows_are_distinct_for_every_count(layout):
    """Rounding collisions are refilled: exactly n distinct S rows for every n up to |S| (then all of S)."""
    s0, s1 = layout.sparse_rows
    for n in range(1, s1 - s0 + 3):
        rows = probe_rows(layout, n)
        assert rows.numel() == min(n, s1 - s0) == rows.unique().numel(), n
        assert ((rows >= s0) & (rows < s1)).all(), n
    assert torch.equal(probe_rows(layout, s1 - s0), torch.arange(s0, s1))


def test_grid_to_index_is_the_raster_map():
    for layout in (TokenLayout.text_first((5, 7, 9), 11), TokenLayout.video_first((6, 6, 10), 13)):
        T, H, W = layout.grid
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
        idx = grid_to_index(layout, t.flatten(), h.flatten(), w.flatten())
        assert torch.equal(idx, torch.arange(layout.video_offset, layout.video_offset + layout.num_video))
        rows = probe_rows(layout, 20)
        assert torch.equal(grid_to_index(layout, *_thw(layout, rows)), rows)


@pytest.mark.parametrize("order", [(1, 2, 4), (2, 3, 3)])
def test_probe_rows_follow_a_tiled_token_order(order):
    """With video tokens in tiles, the probes sit at the same (t, h, w) cells as in raster order."""
    raster = TokenLayout.text_first((5, 7, 9), 11)
    tiled = TokenLayout.text_first((5, 7, 9), 11, order=order)
    for n in (9, 40):
        a, b = probe_rows(raster, n), probe_rows(tiled, n)
        assert bool((b.diff() > 0).all()) and not torch.equal(a, b)
        assert sorted(zip(*(x.tolist() for x in _thw(raster, a)))) == sorted(zip(*(x.tolist() for x in _thw(tiled, b))))


@pytest.mark.parametrize("grid,text", [((13, 30, 45), 226), ((21, 30, 52), 0), ((4, 32, 32), 0)],
                         ids=["cogvideox-480p", "wan-1.3b-480p", "smallest-default-sparse-call"])
def test_probe_flops_within_half_a_percent(grid, text):
    """Probing costs 2 n_q N d FLOPs against 4 N^2 d for the call: n_q / (2N) <= 0.5% with the defaults, down to the
    smallest call they let run sparse (min_video_tokens=4096, where the 32-row floor gives 0.39%)."""
    cfg = RainFusionConfig()
    layout = TokenLayout.video_first(grid, text) if text == 0 else TokenLayout.text_first(grid, text)
    assert layout.num_video >= cfg.min_video_tokens
    plan = RainFusionPlan(layout, pattern_params(cfg, grid), cfg.block_m, cfg.block_n, cfg.probe_budget,
                          cfg.probe_min_rows)
    n_q, N = plan.probe_rows.numel(), layout.seq_len
    assert n_q >= cfg.probe_min_rows
    assert (2 * n_q * N) / (4 * N * N) <= 0.005


# --------------------------------------------------------------------------- decision rule
def _fake_plan(spatial: float, temporal: float, textural: float, stride: int = 2):
    return SimpleNamespace(density={DENSE: 1.0, SPATIAL: spatial, TEMPORAL: temporal, TEXTURAL: textural},
                           params=SimpleNamespace(stride=stride))


def test_cheapest_rule_takes_the_cheapest_pattern_that_keeps_enough():
    plan = _fake_plan(0.5, 0.7, 0.4)  # textural < spatial < temporal
    recalls = torch.tensor([[
        [0.95, 0.99, 0.50],  # spatial passes, temporal keeps more: spatial (cheaper)
        [0.80, 0.97, 0.91],  # textural is the cheapest passing
        [0.80, 0.85, 0.70],  # none reaches 0.9: dense
        [0.80, 0.92, 0.70],  # only temporal passes
    ]])
    cheapest = choose_patterns(recalls, plan, [SPATIAL, TEMPORAL, TEXTURAL], 0.9).tolist()
    assert cheapest == [[SPATIAL, TEXTURAL, DENSE, TEMPORAL]]
    argmax = choose_patterns(recalls, plan, [SPATIAL, TEMPORAL, TEXTURAL], 0.9, rule="argmax").tolist()
    assert argmax == [[TEMPORAL, TEMPORAL, DENSE, TEMPORAL]]
    # equal densities: the order spatial, temporal, textural; non-candidates and degenerate patterns never win
    tie = choose_patterns(torch.full((1, 1, 3), 0.95), _fake_plan(0.5, 0.5, 0.5), [1, 2, 3], 0.9)
    assert tie.item() == SPATIAL
    assert choose_patterns(recalls, plan, [TEMPORAL], 0.9).tolist() == [[TEMPORAL, TEMPORAL, DENSE, TEMPORAL]]
    assert choose_patterns(recalls[:, 1:2], _fake_plan(0.5, 0.7, 1.0, stride=1), [1, 2, 3], 0.9).item() == TEMPORAL


def test_arm_rule_is_validated():
    with pytest.raises(ValueError, match=r"arm_rule must be one of \('cheapest', 'argmax'\)"):
        RainFusionConfig(arm_rule="best")
    with pytest.raises(ValueError, match="cheapest"):
        choose_patterns(torch.zeros(1, 1, 3), _fake_plan(0.5, 0.5, 0.5), [1], 0.5, rule="max")
    assert RainFusionConfig().arm_rule == "cheapest"


# --------------------------------------------------------------------------- planted heads, several strengths
#: Blocks of 2 rows and 6 blocks per frame (CogVideoX 480p: 128-token blocks are ~2.8 rows, ~10 per frame).
PLANT_GRID, PLANT_BLOCK = (9, 12, 16), 32
#: A weak head keeps little mass even in its own pattern (one-hot logit gain strength^2 / sqrt(d): 1, 2.25, 4 nats),
#: so it is recognisable only at a threshold between what the cheaper patterns keep and what its own pattern keeps;
#: the test checks the exact oracle agrees that each threshold separates them.
PLANT_TAU = {2: 0.5, 3: 0.6, 4: 0.8}
PLANT_LAYOUTS = [TokenLayout.text_first(PLANT_GRID, 16), TokenLayout.video_first(PLANT_GRID, 16)]


def _exact_kept(q, k, plan):
    """Exact kept mass of each pattern's executed mask over all S rows: (B, H, 3)."""
    s0, s1 = plan.layout.sparse_rows
    p = torch.softmax(q[:, :, s0:s1].double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return torch.stack([(p * plan.token_mask(c)[s0:s1].double()).sum(-1).mean(-1) for c in (1, 2, 3)], dim=-1)


def _planted_run(layout, strength, rule, kinds=("spatial", "temporal", "textural")):
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=PLANT_BLOCK,
                           block_n=PLANT_BLOCK, arm_threshold=PLANT_TAU[strength], arm_rule=rule)
    method, ctx = RainFusionMethod(cfg), _ctx()
    plan = method.plan(layout)
    q, k, v = planted_qkv(layout, 2, list(kinds), 16, strength=strength, stride=plan.params.stride, seed=strength)
    run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0, context=ctx,
               dense_fn=lambda: torch.zeros_like(q))
    return ctx.last_decisions[0].patterns, q, k, plan


@pytest.mark.parametrize("strength", [2, 3, 4])
@pytest.mark.parametrize("layout", PLANT_LAYOUTS, ids=["text-first", "video-first"])
def test_arm_recognises_planted_heads_of_every_strength(layout, strength):
    kinds = ("spatial", "temporal", "textural")
    patterns, q, k, plan = _planted_run(layout, strength, "cheapest", kinds)
    expected = np.array([[KIND[x] for x in kinds]] * 2)
    oracle = choose_patterns(_exact_kept(q, k, plan).float(), plan, [1, 2, 3], PLANT_TAU[strength]).numpy()
    assert np.array_equal(oracle, expected), ("the threshold must separate the planted pattern", oracle)
    assert np.array_equal(patterns, expected), patterns


def test_argmax_rule_lets_temporal_swallow_weak_heads():
    """The regression the cheapest rule fixes: at strength 2, temporal executes more keys than spatial and
    textural, so raw recall (argmax) calls every weak head temporal."""
    patterns, *_ = _planted_run(PLANT_LAYOUTS[0], 2, "argmax")
    assert (patterns == TEMPORAL).all(), patterns
    patterns, *_ = _planted_run(PLANT_LAYOUTS[0], 2, "cheapest")
    assert patterns[:, 0].tolist() == [SPATIAL] * 2 and patterns[:, 2].tolist() == [TEXTURAL] * 2


# --------------------------------------------------------------------------- autograd
def test_arm_runs_on_inputs_that_require_grad():
    """q, k, v with requires_grad (a training or probing forward): ARM decides as without grad, records plain
    numpy, and the output carries gradients."""
    layout = TokenLayout.video_first((6, 6, 8), 10)
    q0, k0, v0 = planted_qkv(layout, 2, ["spatial", "temporal", "textural", "random"], 16)
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                           block_n=16)
    decisions = []
    for grad in (False, True):
        q, k, v = (x.clone().requires_grad_(grad) for x in (q0, k0, v0))
        ctx = _ctx()
        out = run_method(RainFusionMethod(cfg), q, k, v, layout=layout, key_padding_mask=None, scale=None,
                         layer_index=0, context=ctx, dense_fn=lambda: F.scaled_dot_product_attention(q, k, v))
        dec = ctx.last_decisions[0]
        assert isinstance(dec.recalls, np.ndarray) and isinstance(dec.patterns, np.ndarray)
        decisions.append(dec.patterns)
        if grad:
            assert out.requires_grad
            out.square().sum().backward()
            assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
    assert np.array_equal(*decisions) and set(decisions[0][0].tolist()) >= {SPATIAL, TEMPORAL, TEXTURAL, DENSE}


@pytest.mark.parametrize("force", ["spatial", "temporal", "textural"])
def test_sparse_gradients_equal_masked_dense_gradients(force):
    """fp64: d/dq, d/dk, d/dv through the sparse path equal those of dense attention with the executed mask
    (``plan.token_mask``), key padding included."""
    layout = TokenLayout.text_first((5, 6, 8), 9)
    B, H, D, N = 2, 2, 16, layout.seq_len
    g = torch.Generator().manual_seed(3)
    q0, k0, v0, w = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(4))
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, layout.text_len - 3 : layout.text_len] = False
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                           block_n=16, force_pattern=force)
    method = RainFusionMethod(cfg)
    q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    out = run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0,
                     context=_ctx(), dense_fn=lambda: pytest.fail("a forced pattern never runs the stock path"))
    (out * w).sum().backward()
    qr, kr, vr = (x.clone().requires_grad_() for x in (q0, k0, v0))
    mask = method.plan(layout).token_mask(KIND[force])[None, None] & kpm[:, None, None, :]
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
    (ref * w).sum().backward()
    assert rel_err(out.detach(), ref.detach()) < 1e-12
    for a, b in ((q, qr), (k, kr), (v, vr)):
        assert rel_err(a.grad, b.grad) < 1e-10
