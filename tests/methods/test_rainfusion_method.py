"""RainFusion method: sparsity mapping, block plans vs the token-level spec, execution vs oracle, ARM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err

from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.kernels import masked_attention_reference
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import (
    DENSE,
    SPATIAL,
    TEMPORAL,
    TEXTURAL,
    PatternParams,
    RainFusionConfig,
    RainFusionMethod,
    RainFusionPlan,
    arm_recalls,
    pattern_params,
)
from diffusers_attn.testing import planted_qkv


# --------------------------------------------------------------------------- mapping (spec 2.4 worked examples)
@pytest.mark.parametrize("T,w", [(13, 2), (21, 4), (33, 6)])
def test_spatial_window_examples(T, w):
    assert pattern_params(RainFusionConfig(sparsity=0.64), (T, 30, 45)).window == w


@pytest.mark.parametrize("H,r", [(30, 6), (45, 9)])
def test_temporal_rows_examples(H, r):
    assert pattern_params(RainFusionConfig(sparsity=0.64), (13, H, 45)).rows == r


def test_textural_stride_and_overrides():
    assert pattern_params(RainFusionConfig(sparsity=0.64), (13, 30, 45)).stride == 2
    assert pattern_params(RainFusionConfig(sparsity=0.9), (13, 30, 45)).stride == 3
    p = pattern_params(RainFusionConfig(spatial_window=1, temporal_rows=2, textural_stride=4), (13, 30, 45))
    assert (p.window, p.rows, p.stride) == (1, 2, 4)


# --------------------------------------------------------------------------- independent token-level definitions
def spec_token_mask(layout: TokenLayout, params: PatternParams, pattern: int) -> torch.Tensor:
    """Section 2.2/2.3 written directly, token by token: the minimal key set of each query."""
    N = layout.seq_len
    T, H, W = layout.grid
    pos = torch.arange(N)
    rel = pos - layout.video_offset
    vid = (rel >= 0) & (rel < layout.num_video)
    t = torch.where(vid, rel // (H * W), -1)
    h = torch.where(vid, (rel % (H * W)) // W, -1)
    w = torch.where(vid, rel % W, -1)
    dense_tok = (vid & (t == 0)) | ~vid  # first frame and text
    if pattern == DENSE:
        return torch.ones(N, N, dtype=torch.bool)
    if pattern == SPATIAL:
        keep = (t[:, None] - t[None, :]).abs() <= params.window
    elif pattern == TEMPORAL:
        keep = (h[:, None] - h[None, :]).abs() <= params.rows
    else:
        keep = ((h % params.stride == 0) & (w % params.stride == 0))[None, :].expand(N, N)
    keep = keep & vid[None, :] & (t[None, :] >= 1)
    mask = keep | dense_tok[None, :] | dense_tok[:, None]
    return mask


LAYOUTS = [
    TokenLayout.text_first((5, 7, 9), 11),  # CogVideoX style, odd grid, nothing aligned
    TokenLayout.video_first((6, 6, 10), 13),  # HunyuanVideo style
    TokenLayout.video_first((4, 5, 5), 0),  # no text
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["text-first", "video-first", "no-text"])
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (8, 24)])
@pytest.mark.parametrize("pattern", [SPATIAL, TEMPORAL, TEXTURAL])
def test_plan_covers_spec_and_is_not_dense(layout, bm, bn, pattern):
    params = pattern_params(RainFusionConfig(sparsity=0.75), layout.grid)
    plan = RainFusionPlan(layout, params, bm, bn, 0.002, 8)
    executed = plan.token_mask(pattern)
    spec = spec_token_mask(layout, params, pattern)
    assert (executed | ~spec).all(), "executed mask drops keys the pattern requires"
    if pattern == TEXTURAL:
        assert torch.equal(executed, spec), "textural is token-exact"
    # recorded plan density is the executed mask's density
    assert plan.density[pattern] == pytest.approx(executed.double().mean().item(), rel=1e-9)


def test_nominal_density_tracks_sparsity_and_realized_is_above():
    """Token-level (nominal) video-key density of each pattern is near 1 - sparsity; the executed (realized)
    density is never below it and block rounding costs a bounded amount."""
    layout = TokenLayout.text_first((21, 12, 16), 32)  # Wan-like frame count, small frames to keep N^2 small
    n_v, s0 = layout.num_video, layout.sparse_rows[0]
    for sparsity in (0.5, 0.64, 0.8):
        params = pattern_params(RainFusionConfig(sparsity=sparsity), layout.grid)
        plan = RainFusionPlan(layout, params, 32, 32, 0.002, 32)
        target = 1 - sparsity
        for p in (SPATIAL, TEMPORAL, TEXTURAL):
            if p == TEXTURAL and params.stride == 1:  # s = round(1/sqrt(D)) = 1 means dense by definition
                assert plan.video_pairs(p) == n_v**2
                continue
            # nominal: S rows x video keys of frames >= 1 in the spec's token mask
            spec = spec_token_mask(layout, params, p)[s0 : s0 + n_v - layout.frame_tokens, s0 : s0 + n_v]
            nominal = spec.double().mean().item()
            assert abs(nominal - target) < 0.12, (sparsity, p, nominal)
            realized = plan.video_pairs(p) / n_v**2
            assert realized >= spec_token_mask(layout, params, p)[32:, 32:].double().mean().item() - 1e-12
            assert realized < 1.0


# --------------------------------------------------------------------------- execution vs oracle
def _ctx():
    class _A:  # the method never touches the adapter
        pass

    return AttentionContext(_A())


def _qkv(B, H, N, D, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["text-first", "video-first"])
@pytest.mark.parametrize("force", ["spatial", "temporal", "textural"])
def test_forced_pattern_matches_explicit_mask(layout, force):
    B, H, D = 2, 3, 16
    N = layout.seq_len
    q, k, v = _qkv(B, H, N, D, seed=len(force))
    kpm = torch.ones(B, N, dtype=torch.bool)
    if layout.text_len:
        kpm[1, layout.text_offset + layout.text_len - 4 : layout.text_offset + layout.text_len] = False
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                           block_n=16, force_pattern=force)
    method = RainFusionMethod(cfg)
    ctx = _ctx()
    out = run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0, context=ctx,
                 dense_fn=lambda: pytest.fail("dense path must not run"))
    plan = method.plan(layout)
    pid = {"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}[force]
    mask = plan.token_mask(pid)[None, None] & kpm[:, None, None, :]
    ref = masked_attention_reference(q, k, v, mask)
    assert rel_err(out, ref) < 1e-5
    stats = ctx.stats.summary()
    assert stats.density < 1.0 and stats.pattern_histogram[force] == B * H


def test_mixed_arm_patterns_match_per_head_masks():
    """ARM at threshold 0 with the argmax rule gives each head its own best pattern; every head matches its own
    explicit mask."""
    layout = TokenLayout.video_first((6, 6, 8), 10)
    B, H, D = 2, 6, 16
    q, k, v = planted_qkv(layout, B, ["spatial", "temporal", "textural", "spatial", "temporal", "random"], D)
    kpm = torch.ones(B, layout.seq_len, dtype=torch.bool)
    kpm[0, -3:] = False
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                           block_n=16, arm_threshold=0.0, arm_rule="argmax")
    method, ctx = RainFusionMethod(cfg), _ctx()
    out = run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=3, context=ctx,
                 dense_fn=lambda: pytest.fail("dense path must not run"))
    dec = ctx.last_decisions[3]
    assert len(set(dec.patterns.flatten().tolist())) >= 3
    plan = method.plan(layout)
    for b in range(B):
        for h in range(H):
            mask = plan.token_mask(int(dec.patterns[b, h])) & kpm[b][None, :]
            ref = masked_attention_reference(q[b, h], k[b, h], v[b, h], mask)
            assert rel_err(out[b, h], ref) < 1e-5, (b, h, dec.patterns[b, h])


# --------------------------------------------------------------------------- ARM on planted structure
@pytest.mark.parametrize("kind,expected", [("spatial", SPATIAL), ("temporal", TEMPORAL), ("textural", TEXTURAL)])
@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["text-first", "video-first"])
def test_arm_picks_planted_pattern(kind, expected, layout):
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                           block_n=16, arm_threshold=0.9)
    method, ctx = RainFusionMethod(cfg), _ctx()
    q, k, v = planted_qkv(layout, 2, [kind, kind])
    run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0, context=ctx,
           dense_fn=lambda: pytest.fail("a structured head must not run dense"))
    dec = ctx.last_decisions[0]
    assert (dec.patterns == expected).all(), (dec.patterns, dec.recalls)
    assert (dec.recalls[..., expected - 1] >= 0.9).all()


def test_arm_falls_back_to_dense_on_unstructured_qk():
    layout = LAYOUTS[0]
    q, k, v = planted_qkv(layout, 2, ["random"] * 3)
    base = dict(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16, block_n=16)
    method, ctx = RainFusionMethod(RainFusionConfig(**base, arm_threshold=0.9)), _ctx()
    called = []
    out = run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0, context=ctx,
                 dense_fn=lambda: called.append(1) or torch.zeros_like(q))
    assert called, "all-dense decision must use the stock dense path"
    assert (ctx.last_decisions[0].patterns == DENSE).all()
    assert ctx.stats.summary().pattern_histogram["dense"] == 6
    # threshold 0 never keeps dense: argmax takes the best pattern, cheapest the cheapest
    for rule in ("argmax", "cheapest"):
        method0, ctx0 = RainFusionMethod(RainFusionConfig(**base, arm_threshold=0.0, arm_rule=rule)), _ctx()
        run_method(method0, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0, context=ctx0,
                   dense_fn=lambda: pytest.fail("threshold 0 never keeps dense"))
        assert (ctx0.last_decisions[0].patterns != DENSE).all()


def test_arm_recalls_match_full_attention_mass():
    """Recall from probe rows equals the mass inside the executed mask computed from full attention."""
    layout = LAYOUTS[1]
    cfg = RainFusionConfig(sparsity=0.75, block_m=16, block_n=16, probe_min_rows=5)
    method = RainFusionMethod(cfg)
    plan = method.plan(layout)
    q, k, _ = _qkv(1, 2, layout.seq_len, 8, seed=5, scale=2.0)
    kpm = torch.ones(1, layout.seq_len, dtype=torch.bool)
    kpm[0, -5:] = False
    rec = arm_recalls(q, k, plan, plan.on(q.device), kpm, None)
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 8**0.5).masked_fill(~kpm[0], float("-inf")), -1)
    rows = plan.probe_rows
    for j, pat in enumerate((SPATIAL, TEMPORAL, TEXTURAL)):
        m = plan.token_mask(pat)[rows].double()
        expected = (p[0][:, rows] * m).sum(-1).mean(-1)
        assert torch.allclose(rec[0, :, j].double(), expected, atol=1e-5)
    # probe rows lie in S and are spread over frames t >= 1
    s0, s1 = layout.sparse_rows
    assert ((rows >= s0) & (rows < s1)).all()
    frames = ((rows - layout.video_offset) // layout.frame_tokens).unique()
    assert len(frames) == layout.frames - 1


def test_probe_cost_is_about_the_budget():
    layout = TokenLayout.text_first((13, 30, 45), 226)  # CogVideoX-5B 480p
    plan = RainFusionPlan(layout, pattern_params(RainFusionConfig(), layout.grid), 128, 64, 0.002, 32)
    ratio = plan.probe_rows.numel() / (2 * layout.seq_len)  # 2 n_q N d / (4 N^2 d)
    assert plan.probe_rows.numel() == 72
    assert 0.0019 < ratio < 0.0021


# --------------------------------------------------------------------------- schedule and fallbacks
def test_fallback_reasons_and_schedule():
    layout = TokenLayout.text_first((5, 4, 4), 8)
    ctx = _ctx()
    ctx.num_inference_steps = 8
    m = RainFusionMethod(RainFusionConfig(sparsity=0.5, dense_steps=0.25, dense_tail_steps=1, dense_layers=1,
                                          skip_layers=(3,), min_video_tokens=0))
    for step, layer, reason in [
        (0, 2, "dense warm-up step"), (1, 2, "dense warm-up step"), (2, 2, None), (7, 2, "dense tail step"),
        (4, 0, "dense layer (dense_layers)"), (4, 3, "dense layer (skip_layers)"),
    ]:
        ctx.tracker.step = step
        assert m.fallback_reason(layout, layer, ctx) == reason, (step, layer)
    ctx.tracker.step = 4
    assert m.fallback_reason(TokenLayout.text_first((2, 8, 8), 8), 2, ctx) == "2 or fewer latent frames"
    big = RainFusionMethod(RainFusionConfig(min_video_tokens=4096, dense_steps=0, dense_layers=0))
    assert "min_video_tokens" in big.fallback_reason(layout, 2, ctx)
    assert RainFusionMethod(RainFusionConfig(sparsity=0)).fallback_reason(layout, 5, ctx) == "sparsity=0"


def test_fraction_without_total_steps_is_a_clear_error():
    ctx = _ctx()
    m = RainFusionMethod(RainFusionConfig(dense_steps=0.25))
    with pytest.raises(ValueError, match="fraction of the run"):
        m.fallback_reason(TokenLayout.text_first((5, 4, 4), 8), 2, ctx)


def test_arm_refresh_reuses_decisions():
    layout = LAYOUTS[1]
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                           block_n=16, arm_threshold=0.0, arm_rule="argmax", arm_refresh_steps=2)
    method, ctx = RainFusionMethod(cfg), _ctx()
    q1, k1, v1 = planted_qkv(layout, 1, ["spatial"])
    q2, k2, v2 = planted_qkv(layout, 1, ["temporal"])
    call = lambda q, k, v: run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0,  # noqa
                                  context=ctx, dense_fn=lambda: None)
    ctx.tracker.step = 0
    call(q1, k1, v1)
    assert ctx.last_decisions[0].patterns[0, 0] == SPATIAL
    ctx.tracker.step = 1
    call(q2, k2, v2)  # within the refresh window: decision reused
    assert ctx.last_decisions[0].patterns[0, 0] == SPATIAL
    ctx.tracker.step = 2
    call(q2, k2, v2)
    assert ctx.last_decisions[0].patterns[0, 0] == TEMPORAL


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(dense_steps=1.5), "fraction"),
        (dict(dense_steps=-1), "dense_steps"),
        (dict(dense_layers=-1), "dense_layers"),
        (dict(arm_threshold=1.2), "arm_threshold"),
        (dict(patterns=("spatial", "diagonal")), "patterns"),
        (dict(force_pattern="nope"), "force_pattern"),
        (dict(block_m=0), "block_m"),
        (dict(textural_stride=0), "textural_stride"),
        (dict(arm_refresh_steps=0), "arm_refresh_steps"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(min_video_tokens=-5), "min_video_tokens"),
    ],
)
def test_invalid_config_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RainFusionConfig(**kwargs)


def test_stats_pairs_account_for_padding():
    layout = TokenLayout.video_first((4, 4, 4), 8)
    plan = RainFusionPlan(layout, PatternParams(1, 1, 2), 16, 16, 0.002, 4)
    N = layout.seq_len
    c, t = plan.pairs(DENSE, 3)
    assert c == t == N * (N - 3)
    c, t = plan.pairs(SPATIAL, 3)
    mask = plan.token_mask(SPATIAL).clone()
    mask[:, N - 3 :] = False
    assert c == mask.sum().item()
    c, _ = plan.pairs(TEXTURAL, 3)
    mask = plan.token_mask(TEXTURAL).clone()
    mask[:, N - 3 :] = False
    assert c == mask.sum().item()
    assert np.isclose(plan.video_pairs(TEXTURAL), plan.token_mask(TEXTURAL)[:64, :64].sum().item())


def test_triton_table_path_matches_grouped_torch_path():
    """The compact-table execution (one kernel launch + textural gather) equals the grouped PyTorch path."""
    pytest.importorskip("triton")
    from diffusers_attn.kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not registered")
    layout = TokenLayout.video_first((4, 6, 8), 10)  # small: the interpreter is slow
    B, D = 1, 16
    kinds = ["spatial", "temporal", "textural", "random"]
    q, k, v = planted_qkv(layout, B, kinds, D)
    kpm = torch.ones(B, layout.seq_len, dtype=torch.bool)
    kpm[0, -3:] = False
    outs, decisions = {}, {}
    for backend in ("torch", "triton"):
        cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16,
                               block_n=16, arm_threshold=0.95, kernel_backend=backend)
        method, ctx = RainFusionMethod(cfg), _ctx()
        outs[backend] = run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0,
                               context=ctx, dense_fn=lambda: pytest.fail("mixed heads never take the stock path"))
        decisions[backend] = ctx.last_decisions[0].patterns
    assert np.array_equal(decisions["torch"], decisions["triton"])
    assert set(decisions["torch"].flatten().tolist()) >= {DENSE, SPATIAL, TEMPORAL, TEXTURAL}
    assert rel_err(outs["triton"], outs["torch"]) < 1e-5


def test_tile_order_only_where_it_changes_the_order():
    """A tile covering whole frames orders tokens as raster does, so the raster plan (calibrated windows) is kept."""
    from diffusers_attn.methods.rainfusion.method import RainFusionMethod

    m = RainFusionMethod(RainFusionConfig(sparsity=0.6))
    assert m.config.resolved_tile == (1, 8, 16)
    assert m.token_order((9, 8, 8)) is None  # an (8, 16) tile covers the 8 x 8 frame: identity permutation
    assert m.token_order((13, 60, 90)) == (1, 8, 16)  # CogVideoX-5B grid: a real permutation
    assert RainFusionMethod(RainFusionConfig(sparsity=0.6, tile=(2, 4, 8), min_video_tokens=0)).token_order((9, 8, 8)) == (2, 4, 8)
    assert RainFusionMethod(RainFusionConfig(sparsity=0.6, token_order="raster")).token_order((13, 60, 90)) is None
def _triton_or_skip():
    pytest.importorskip("triton")
    from diffusers_attn.kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not registered")


@pytest.mark.parametrize("dense_heads", ["sdpa", "kernel"])
def test_triton_path_mixed_heads_per_batch_match_per_head_masks(dense_heads):
    """Triton path, both dense-head routes: batch elements with different patterns per head and different padding;
    every head equals the reference over its own executed mask (dense heads: all valid keys)."""
    _triton_or_skip()
    layout = TokenLayout.video_first((4, 6, 8), 10)
    D = 16
    kinds = ["spatial", "temporal", "textural", "random"]
    qa, ka, va = planted_qkv(layout, 1, kinds, D, seed=1)
    qb, kb, vb = planted_qkv(layout, 1, kinds[::-1], D, seed=2)
    q, k, v = torch.cat([qa, qb]), torch.cat([ka, kb]), torch.cat([va, vb])
    kpm = torch.ones(2, layout.seq_len, dtype=torch.bool)
    kpm[0, -3:] = False
    kpm[1, -7:] = False
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16, block_n=16,
                           arm_threshold=0.95, kernel_backend="triton", dense_heads=dense_heads)
    method, ctx = RainFusionMethod(cfg), _ctx()
    out = run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0, context=ctx,
                     dense_fn=lambda: pytest.fail("mixed heads never take the stock path"))
    dec = ctx.last_decisions[0]
    assert {DENSE, SPATIAL, TEMPORAL, TEXTURAL} <= set(dec.patterns.flatten().tolist())
    assert not np.array_equal(dec.patterns[0], dec.patterns[1])
    plan = method.plan(layout)
    for b in range(2):
        for h in range(len(kinds)):
            mask = plan.token_mask(int(dec.patterns[b, h])) & kpm[b][None, :]
            ref = masked_attention_reference(q[b, h], k[b, h], v[b, h], mask)
            assert rel_err(out[b, h], ref) < 1e-5, (dense_heads, b, h, dec.patterns[b, h])
    stats = ctx.stats.summary()  # the pending record, read now: the same accounting as the torch path
    ref_ctx = _ctx()
    ref_method = RainFusionMethod(RainFusionConfig(**{**cfg.__dict__, "kernel_backend": "torch"}))
    run_method(ref_method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0, context=ref_ctx,
               dense_fn=lambda: pytest.fail("mixed heads never take the stock path"))
    ref_stats = ref_ctx.stats.summary()
    assert stats.density == pytest.approx(ref_stats.density, rel=1e-12)
    assert stats.pattern_histogram == ref_stats.pattern_histogram


@pytest.mark.parametrize("dense_heads", ["sdpa", "kernel"])
def test_triton_path_all_dense_heads(dense_heads):
    """Every head dense: "sdpa" returns the stock call itself (known after the one host read); "kernel" (no host
    read, so it cannot know) computes them in the kernel over all blocks, equal to dense attention."""
    _triton_or_skip()
    layout = TokenLayout.text_first((4, 6, 8), 10)
    B, H, D = 1, 3, 16
    q, k, v = _qkv(B, H, layout.seq_len, D, seed=5)
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16, block_n=16,
                           arm_threshold=1.0, patterns=("spatial",), kernel_backend="triton", dense_heads=dense_heads)
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    method, ctx = RainFusionMethod(cfg), _ctx()
    marker = stock.clone()
    out = run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0, context=ctx,
                     dense_fn=lambda: marker)
    assert (ctx.last_decisions[0].patterns == DENSE).all()
    if dense_heads == "sdpa":
        assert out is marker
    else:
        assert rel_err(out, stock) < 1e-5
    assert ctx.stats.summary().pattern_histogram["dense"] == B * H


@pytest.mark.parametrize("kernel_wins", [True, False])
def test_auto_dense_heads_follow_the_measurement(monkeypatch, kernel_wins):
    """``dense_heads="auto"``: the route is the side that measured faster (the device is declared measurable and the
    clock faked, so both outcomes run here); either way every head equals its reference and the stats say where."""
    _triton_or_skip()
    from diffusers_attn.kernels import dense_route

    dense_route.reset()
    monkeypatch.setattr(dense_route, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dense_route, "_elapsed_ms",
                        lambda fn, device: (fn(), 1.0 if (fn.__name__ == "kernel") == kernel_wins else 2.0)[1])
    layout = TokenLayout.video_first((4, 6, 8), 10)
    q, k, v = planted_qkv(layout, 1, ["spatial", "temporal", "textural", "random"], 16, seed=1)
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16, block_n=16,
                           arm_threshold=0.95, kernel_backend="triton")
    assert cfg.dense_heads == "auto"
    method, ctx = RainFusionMethod(cfg), _ctx()
    try:
        out = run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0,
                         context=ctx, dense_fn=lambda: pytest.fail("mixed heads never take the stock path"))
        dec = ctx.last_decisions[0]
        assert DENSE in dec.patterns and TEXTURAL in dec.patterns
        plan = method.plan(layout)
        for h in range(4):
            ref = masked_attention_reference(q[0, h], k[0, h], v[0, h], plan.token_mask(int(dec.patterns[0, h])))
            assert rel_err(out[0, h], ref) < 1e-5, (kernel_wins, h)
        info = ctx.stats.summary().info
        assert info["dense_heads"] == ("kernel" if kernel_wins else "sdpa")
        [rec] = info["dense_heads_measured"]
        assert rec["choice"] == info["dense_heads"] and rec["n_q"] == layout.seq_len
    finally:
        dense_route.reset()


def test_auto_dense_heads_off_gpu_take_sdpa_without_measuring():
    """Off CUDA the Triton path is the interpreter: timing it would say nothing, so "auto" takes SDPA."""
    _triton_or_skip()
    from diffusers_attn.kernels import dense_route

    dense_route.reset()
    layout = TokenLayout.video_first((4, 6, 8), 10)
    q, k, v = planted_qkv(layout, 1, ["spatial", "random"], 16, seed=3)
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16, block_n=16,
                           arm_threshold=0.95, kernel_backend="triton")
    ctx = _ctx()
    run_method(RainFusionMethod(cfg), q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=0,
               context=ctx, dense_fn=lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    info = ctx.stats.summary().info
    assert info["dense_heads"] == "sdpa" and "dense_heads_measured" not in info
    assert dense_route.measurements() == []


def test_stats_pending_until_read():
    """A sparse call leaves its numbers on the device; reading the stats records them once, in call order."""
    layout = TokenLayout.text_first((4, 6, 8), 10)
    q, k, v = _qkv(1, 2, layout.seq_len, 16, seed=3)
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=1, min_video_tokens=0, block_m=16, block_n=16)
    method, ctx = RainFusionMethod(cfg), _ctx()
    for layer in (1, 0, 2):  # layer 0 is a dense (host) record queued behind a pending one
        run_method(method, q, k, v, layout=layout, key_padding_mask=None, scale=None, layer_index=layer,
                   context=ctx, dense_fn=lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert ctx.stats.has_pending and not ctx.stats.layers
    stats = ctx.stats.summary()
    assert not ctx.stats.has_pending
    assert [layer.layer for layer in stats.layers] == [0, 1, 2] and stats.calls == 3
    assert stats.dense_fallbacks == {"dense layer (dense_layers)": 1}


def test_dense_heads_setting_is_validated():
    with pytest.raises(ValueError, match="dense_heads must be one of"):
        RainFusionConfig(dense_heads="flash")
