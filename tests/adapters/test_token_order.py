"""Tile token order: the permutation, its round trip, model outputs unchanged by the order itself, and the sparse
semantics in tile order (block lists follow spatio-temporal boxes)."""

from __future__ import annotations

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, make_cogvideox, make_hunyuan, rel_err

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.adapters.token_order import TokenPermuter
from diffusers_attn.layout import TokenLayout, tile_permutation

SPARSE = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, num_inference_steps=10, arm_threshold=0.0,
              token_order="tiles")


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def test_tile_permutation_keeps_the_first_frame_and_makes_blocks_boxes():
    grid, tile = (4, 16, 32), (1, 8, 16)
    perm = tile_permutation(grid, tile)
    assert sorted(perm.tolist()) == list(range(4 * 16 * 32))
    assert torch.equal(perm[: 16 * 32], torch.arange(16 * 32))  # frame 0 in place
    t, h, w = perm // 512, (perm % 512) // 32, perm % 32
    for b in range(512 // 128, perm.numel() // 128):  # every 128-token block of frames >= 1 is one 1 x 8 x 16 tile
        sl = slice(b * 128, (b + 1) * 128)
        assert t[sl].unique().numel() == 1
        assert h[sl].max() - h[sl].min() == 7 and w[sl].max() - w[sl].min() == 15
    lay = TokenLayout.video_first(grid, 3, order=tile)
    tt, hh, ww, txt = lay.token_coords()
    assert torch.equal(tt[:-3] * 512 + hh[:-3] * 32 + ww[:-3], perm) and txt[-3:].all() and (tt[-3:] == -1).all()


def test_permuter_round_trip_is_exact_on_tensors_and_tuples():
    p = TokenPermuter((3, 5, 6), (2, 2, 4), torch.device("cpu"))
    x = torch.randn(2, 7 + 90, 4)  # 7 leading text tokens, then the video
    y = p.permute(x, 1)
    assert torch.equal(y[:, :7], x[:, :7]) and not torch.equal(y, x)
    assert torch.equal(p.unpermute(y, 1), x)
    cos, sin = torch.randn(90, 8), torch.randn(90, 8)
    c2, s2 = p.permute((cos, sin), 0)
    assert torch.equal(p.unpermute(c2, 0), cos) and torch.equal(p.unpermute(s2, 0), sin)
    with pytest.raises(ValueError, match="fewer than the 90 video tokens"):
        p.permute(torch.randn(1, 10, 2), 1)


@pytest.mark.parametrize("version,frames", [("1.0", 9), ("1.5", 8)])
def test_cogvideox_tile_order_alone_changes_nothing(version, frames):
    """Every head dense, tokens in tile order (RoPE tables permuted with them): the stock output up to float
    summation order; removing restores stock exactly."""
    model = make_cogvideox(version)
    kw = cogvideox_inputs(model, frames=frames, size=16)
    ref = run(model, kw)
    ctx = apply_rainfusion(model, RainFusionConfig(sparsity=0.5, force_pattern="dense", block_m=16, block_n=16,
                                                   **SPARSE))
    out = run(model, kw)
    assert ctx.token_order == (1, 2, 8)
    assert rel_err(out, ref) < 1e-5
    assert remove_attention_acceleration(model) and torch.equal(run(model, kw), ref)


@pytest.mark.parametrize("dual,single", [(1, 0), (0, 1), (1, 1)])
def test_hunyuan_tile_order_alone_changes_nothing(dual, single):
    model = make_hunyuan(num_layers=dual, num_single_layers=single)
    kw = hunyuan_inputs(frames=5, size=16)
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.5, force_pattern="dense", block_m=16, block_n=16, **SPARSE))
    assert rel_err(run(model, kw), ref) < 1e-5


def test_tile_order_spatial_keeps_its_frame_and_ignores_far_frames():
    """One layer, spatial at w = 0 with 1 x 2 x 8 tiles (4 blocks per 8 x 8 frame): a frame-1 query sees frame 1,
    the first frame and text only, so perturbing frame 3 leaves frame 1's output unchanged; the raster run with the
    same window agrees with it to float precision on frames the perturbation does not reach."""
    model = make_hunyuan(num_layers=1, num_single_layers=0)
    kw = hunyuan_inputs(batch=1, frames=5, size=8, text_len=12, valid=(12,))
    cfg = RainFusionConfig(sparsity=0.75, force_pattern="spatial", spatial_window=0, block_m=16, block_n=16, **SPARSE)
    ctx = apply_rainfusion(model, cfg)
    a = run(model, kw)
    assert ctx.token_order == (1, 2, 8)
    pert = {**kw, "hidden_states": kw["hidden_states"].clone()}
    pert["hidden_states"][0, :, 3] += 1.0
    b = run(model, pert)
    assert torch.equal(a[:, :, 1], b[:, :, 1]) and torch.equal(a[:, :, 4], b[:, :, 4])
    assert not torch.equal(a[:, :, 3], b[:, :, 3])
    st = get_attention_stats(model, log=False)
    # first frame dense as rows and columns (9 of 25 frame pairs) + each later frame with itself (4 of 25)
    assert st.pattern_histogram["spatial"] > 0 and st.video_density == pytest.approx(13 / 25)


def test_budget_is_met_or_reported_and_density_follows_sparsity():
    """In tile order the executed video density meets 1 - sparsity whenever the forced regions allow it, and
    moves with sparsity (no more whole-frame steps)."""
    from diffusers_attn.methods.rainfusion import SPATIAL, TEMPORAL, TEXTURAL, RainFusionMethod

    lay = TokenLayout.text_first((9, 24, 32), 16, order=(1, 4, 16))
    dens = {}
    for sigma in (0.5, 0.7, 0.8):
        m = RainFusionMethod(RainFusionConfig(sparsity=sigma, block_m=64, block_n=64))
        plan = m.plan(lay)
        d = {p: plan.video_pairs(p) / lay.num_video ** 2 for p in (SPATIAL, TEMPORAL, TEXTURAL)}
        unmet = m.budget_unmet.get(lay.grid, [])
        for p, name in ((SPATIAL, "spatial"), (TEMPORAL, "temporal"), (TEXTURAL, "textural")):
            assert (d[p] <= 1 - sigma + 1e-9) == (name not in unmet), (sigma, name, d[p])
        dens[sigma] = d
    for p in (SPATIAL, TEMPORAL, TEXTURAL):
        assert dens[0.5][p] > dens[0.7][p] >= dens[0.8][p]


@pytest.mark.parametrize("model", ["cogvideox", "hunyuan"])
def test_ulysses_degree2_with_tile_order_equals_single_process(tmp_path, model):
    """The permutation happens on the whole sequence before the context-parallel split and is inverted after the
    gather: 2 gloo processes at Ulysses degree 2 equal the single-process tile-order run (fp32)."""
    import torch.multiprocessing as mp

    import _cp_worker

    mp.start_processes(_cp_worker.run, args=(2, str(tmp_path / "init"), model, (0.75,), str(tmp_path), "tiles"),
                       nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        r = torch.load(tmp_path / f"0.75-rank{rank}.pt", weights_only=False)
        assert r["token_order"] == (1, 2, 8)
        assert r["density"] < 1.0 and r["ref_dec"]
        assert rel_err(r["out"], r["ref"]) <= 1e-5, rank


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan"])
def test_compiled_fullgraph_runs_in_tile_order_and_equals_eager(name):
    """Under torch.compile the permutation runs as an opaque op: one graph, no recompilation per step, the plans are
    the tile-order plans (not a silent fall-back to raster) and the output equals eager tile order."""
    if name == "cogvideox":
        model = make_cogvideox("1.5")
        kw = cogvideox_inputs(model, frames=8, size=16)
    else:
        model = make_hunyuan()
        kw = hunyuan_inputs(frames=5, size=16)
    cfg = RainFusionConfig(sparsity=0.75, block_m=16, block_n=16, **SPARSE)
    ctx = apply_rainfusion(model, cfg)
    eager = run(model, kw)
    tile = ctx.token_order
    assert tile is not None
    eager_density = get_attention_stats(model, log=False).density
    ctx = apply_rainfusion(model, cfg)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = run(compiled, kw)
        out2 = run(compiled, {**kw, "timestep": torch.full_like(kw["timestep"], 300)})
    assert out2.shape == out.shape
    assert ctx.token_order == tile and ctx._permuters  # the op built the permutation at run time
    method = next(p.method for p in model.attn_processors.values() if hasattr(p, "method"))
    assert method._solutions and all(key[0].order == tile for key in method._solutions)
    assert rel_err(out, eager) == 0.0
    assert get_attention_stats(model, log=False).density == pytest.approx(eager_density)
