"""RainFusion on WanTransformer3DModel (tiny): stock at sparsity 0, only self-attention replaced, each pattern equal
to dense attention under its explicit mask, token-dependency semantics, batch, odd grids, I2V, TI2V per-token
timesteps, VACE, rf2, tile order and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import make_wan, rel_err, wan_inputs

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.kernels.reference import masked_attention_reference
from diffusers_attn.methods.rainfusion import PATTERN_NAMES

SPARSE = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, num_inference_steps=10, block_m=16, block_n=16)


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def _ours(model):
    return [k for k, p in model.attn_processors.items() if type(p).__module__.startswith("diffusers_attn")]


@pytest.mark.parametrize("variant", ["t2v", "i2v", "vace"])
def test_sparsity0_equals_stock_only_self_attention_replaced_and_remove(variant):
    model = make_wan(num_layers=2, image=variant == "i2v", vace=variant == "vace")
    kw = wan_inputs(model=model)
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.0, num_inference_steps=10))
    ours = _ours(model)
    expected = 2 + (1 if variant == "vace" else 0)  # attn1 of every block (and of the VACE control block)
    assert len(ours) == expected and all(k.endswith(".attn1.processor") for k in ours)
    assert all(type(p).__name__ == "WanAttnProcessor" and type(p).__module__.startswith("diffusers.")
               for k, p in model.attn_processors.items() if k.endswith(".attn2.processor"))
    assert torch.equal(run(model, kw), ref)
    stats = get_attention_stats(model, log=False)
    assert stats.dense_fallbacks == {"sparsity=0": expected} and stats.density == 1.0
    assert remove_attention_acceleration(model) and not _ours(model)
    assert torch.equal(run(model, kw), ref)


@pytest.mark.parametrize("order", ["raster", "tiles"])
@pytest.mark.parametrize("pattern", ["spatial", "temporal", "textural"])
def test_each_pattern_equals_dense_attention_under_its_explicit_mask(pattern, order):
    """Inside the model (q/k/v after norms and RoPE, in the transformer's token order) the executed attention is
    dense attention restricted to the plan's token mask, per batch element and head."""
    model = make_wan(num_layers=1)
    kw = wan_inputs(batch=2, frames=5, h=8, w=16)  # grid 5 x 4 x 8
    cfg = RainFusionConfig(sparsity=0.75, force_pattern=pattern, token_order=order, **SPARSE)
    ctx = apply_rainfusion(model, cfg)
    proc = model.blocks[0].attn1.processor
    seen = []
    inner = proc.run_method

    def capture(q, k, v, *, layout, **kwargs):
        out = inner(q, k, v, layout=layout, **kwargs)
        seen.append((q, k, v, layout, out))
        return out

    proc.run_method = capture
    run(model, kw)
    q, k, v, layout, out = seen[0]
    assert (layout.order is not None) == (order == "tiles") and ctx.token_order == layout.order
    mask = proc.method.plan(layout).token_mask(PATTERN_NAMES.index(pattern))
    assert 0.2 < mask.double().mean() < 1.0
    ref = masked_attention_reference(q, k, v, mask)
    assert rel_err(out, ref) <= 1e-5


def _perturb(kw, frame, rows=slice(None), cols=slice(None), amount=3.0):
    x = kw["hidden_states"].clone()
    x[:, :, frame, rows, cols] += amount
    return {**kw, "hidden_states": x}


@pytest.mark.parametrize("order", ["raster", "tiles"])
def test_spatial_window0_isolates_frames(order):
    """w=0: a query in frame t >= 1 sees frames {0, t} only, so perturbing frame 3 leaves frames 1, 2, 4."""
    model = make_wan(num_layers=1)
    kw = wan_inputs(batch=1, frames=5, h=8, w=16)  # 32 tokens per frame: 16-token blocks never straddle frames
    apply_rainfusion(model, RainFusionConfig(force_pattern="spatial", spatial_window=0, token_order=order, **SPARSE))
    a, b = run(model, kw), run(model, _perturb(kw, 3))
    for t in (1, 2, 4):
        assert torch.equal(a[:, :, t], b[:, :, t]), t
    assert not torch.equal(a[:, :, 3], b[:, :, 3]) and not torch.equal(a[:, :, 0], b[:, :, 0])  # frame 0 dense
    remove_attention_acceleration(model)
    assert not torch.equal(run(model, kw)[:, :, 1], run(model, _perturb(kw, 3))[:, :, 1])  # stock mixes frames


def test_temporal_rows0_isolates_token_rows():
    """r_h=0 (raster): a query at token row h of frame t >= 1 sees row h of every frame and the first frame."""
    model = make_wan(num_layers=1)
    kw = wan_inputs(batch=1, frames=4, h=8, w=16)  # token rows of 8 tokens, 8-token blocks
    cfg = RainFusionConfig(force_pattern="temporal", temporal_rows=0, token_order="raster",
                           **{**SPARSE, "block_m": 8, "block_n": 8})
    apply_rainfusion(model, cfg)
    a, b = run(model, kw), run(model, _perturb(kw, 2, rows=slice(4, 6)))  # latent rows 4-5 = token row 2
    other = [r for r in range(8) if r // 2 != 2]
    assert torch.equal(a[:, :, 1:, other], b[:, :, 1:, other])
    assert not torch.equal(a[:, :, 1:, 4:6], b[:, :, 1:, 4:6])


def test_textural_keeps_non_strided_keys_out():
    """Textural stride 2: a key at an odd token row/column of frame 2 is seen only by its own query (the diagonal
    block) and the dense first-frame rows."""
    model = make_wan(num_layers=1)
    kw = wan_inputs(batch=1, frames=4, h=8, w=16)
    cfg = RainFusionConfig(force_pattern="textural", textural_stride=2, token_order="raster",
                           **{**SPARSE, "block_m": 8, "block_n": 8})
    apply_rainfusion(model, cfg)
    a, b = run(model, kw), run(model, _perturb(kw, 2, rows=slice(2, 4), cols=slice(6, 8)))  # token (1, 3)
    changed = (a != b).any(dim=1)[0]  # (F, 8, 16) latent positions
    assert changed[2, 2:4, 6:8].all() and changed[0].any()
    changed[2, 2:4, 6:8] = False
    changed[0] = False
    assert not changed.any()


def test_batch_elements_are_independent():
    """Batch 2 (as with batched CFG): each element's output equals its own batch-1 run (ARM decides per element)."""
    model = make_wan(num_layers=2)
    kw = wan_inputs(batch=2, frames=5, h=8, w=16)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.75, arm_threshold=0.0, **SPARSE))
    both = run(model, kw)
    assert get_attention_stats(model, log=False).density < 1.0
    for i in range(2):
        one = run(model, {k: v[i : i + 1] if k != "timestep" else v[:1] for k, v in kw.items()})
        assert rel_err(one, both[i : i + 1]) <= 1e-5


def test_odd_grid_full_window_equals_dense_and_sparse_runs():
    model = make_wan(num_layers=1)
    kw = wan_inputs(batch=1, frames=5, h=6, w=14)  # grid 5 x 3 x 7: nothing aligned to 16-token blocks
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(force_pattern="spatial", spatial_window=4, token_order="raster",
                                             **SPARSE))
    assert rel_err(run(model, kw), ref) <= 1e-5
    apply_rainfusion(model, RainFusionConfig(sparsity=0.75, arm_threshold=0.0, **SPARSE))
    out = run(model, kw)
    st = get_attention_stats(model, log=False)
    assert torch.isfinite(out).all() and st.density < 1.0 and st.pattern_histogram.get("fallback", 0) == 0


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v", "vace"])
def test_tile_order_alone_changes_nothing(variant):
    """All heads dense in tile order: the permuted patch embedding, RoPE pair, per-token timesteps (TI2V) and VACE
    control tokens give the stock output up to float summation order."""
    model = make_wan(num_layers=1, image=variant == "i2v", vace=variant == "vace")
    kw = wan_inputs(batch=2, frames=5, h=8, w=32, model=model)  # grid 5 x 4 x 16: tiles are not raster runs
    if variant == "ti2v":  # one timestep per token, different across tiles
        kw["timestep"] = torch.randint(0, 1000, (2, 5 * 4 * 16), generator=torch.Generator().manual_seed(2))
    ref = run(model, kw)
    ctx = apply_rainfusion(model, RainFusionConfig(sparsity=0.5, force_pattern="dense", **SPARSE))
    out = run(model, kw)
    assert ctx.token_order == (1, 2, 8) and ctx.permuter is not None
    assert rel_err(out, ref) <= 1e-5
    if variant == "ti2v":
        assert ctx.tracker.current == float(kw["timestep"][0].max())  # the step's timestep is the largest
    remove_attention_acceleration(model)
    assert torch.equal(run(model, kw), ref)


def test_i2v_sparse_runs_with_image_tokens():
    model = make_wan(num_layers=2, image=True)
    kw = wan_inputs(model=model)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.75, arm_threshold=0.0, **SPARSE))
    out = run(model, kw)
    st = get_attention_stats(model, log=False)
    assert torch.isfinite(out).all() and st.density < 1.0 and len(st.layers) == 2


def test_rf2_runs_within_budget():
    model = make_wan(num_layers=2)
    kw = wan_inputs(batch=2, frames=6, h=16, w=32)  # grid 6 x 8 x 16 = 768 video tokens
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.5, mode="rf2", **SPARSE))
    out = run(model, kw)
    st = get_attention_stats(model, log=False)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert st.pattern_histogram.get("rf2", 0) > 0 and st.video_density <= 0.5 + 1e-9


def test_compiled_fullgraph_tile_order_equals_eager():
    """torch.compile(fullgraph=True): the flattened-dims permutation of the patch embedding and the RoPE pair run
    as the opaque op, no recompilation across steps, same output as eager."""
    model = make_wan(num_layers=1)
    kw = wan_inputs(batch=1, frames=5, h=8, w=32)
    cfg = RainFusionConfig(sparsity=0.75, arm_threshold=0.0, **SPARSE)
    apply_rainfusion(model, cfg)
    eager = run(model, kw)
    ctx = apply_rainfusion(model, cfg)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = run(compiled, kw)
        run(compiled, {**kw, "timestep": torch.full_like(kw["timestep"], 300)})
    assert ctx.token_order == (1, 2, 8) and ctx._permuters
    assert torch.equal(out, eager)
    assert get_attention_stats(model, log=False).steps == 2


def test_unsupported_variants_are_clear_errors():
    from diffusers_attn.parallel import cp_plan_for

    vace = make_wan(vace=True)
    apply_rainfusion(vace, RainFusionConfig(sparsity=0.0, num_inference_steps=4))
    with pytest.raises(ValueError, match="no context-parallel plan for WanVACETransformer3DModel"):
        cp_plan_for(vace)
    model = make_wan()
    apply_rainfusion(model, RainFusionConfig(sparsity=0.0, num_inference_steps=4))
    with pytest.raises(ValueError, match="cross-attention layers keep the stock"):
        model.blocks[0].attn1.processor(model.blocks[0].attn1, torch.randn(1, 4, 24), torch.randn(1, 3, 24))


@pytest.mark.parametrize("model,order", [("wan", "raster"), ("wan-ti2v", "tiles")])
def test_ulysses_degree2_equals_single_process(tmp_path, model, order):
    """2 gloo processes at Ulysses degree 2 (diffusers' own Wan plan: video, RoPE and per-token timesteps split)
    equal the single-process run at sparsity 0 and 0.75, per-head patterns included; in tile order the per-token
    timesteps are permuted before diffusers splits them."""
    import numpy as np
    import torch.multiprocessing as mp

    import _cp_worker

    mp.start_processes(_cp_worker.run, args=(2, str(tmp_path / "init"), model, (0.0, 0.75), str(tmp_path), order),
                       nprocs=2, join=True, start_method="spawn")
    for sparsity in (0.0, 0.75):
        for rank in range(2):
            r = torch.load(tmp_path / f"{sparsity}-rank{rank}.pt", weights_only=False)
            assert rel_err(r["out"], r["ref"]) <= 1e-5, (sparsity, rank)
            if sparsity > 0:
                assert r["density"] < 1.0 and r["ref_dec"]
                assert r["token_order"] == ((1, 2, 8) if order == "tiles" else None)
                for layer, (pat, off) in r["dec"].items():
                    h = pat.shape[1]
                    assert off == rank * h
                    assert np.array_equal(pat, r["ref_dec"][layer][:, off : off + h])


class _TwoExperts:
    pass


def _two_expert_cp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: a two-expert "pipeline" (Wan 2.2 A14B layout), RainFusion on both, then Ulysses on both."""
    import os


    from diffusers_attn.parallel import enable_context_parallel

    from _gloo import gloo_rank

    with gloo_rank(init_file, rank, world):
        experts = [make_wan(num_layers=1, heads=4, head_dim=12) for _ in range(2)]
        with torch.no_grad():
            for p in experts[1].parameters():
                p.mul_(0.9)  # a different second expert
        pipe = _TwoExperts()  # what apply_rainfusion reads of a WanPipeline: its two transformers
        pipe.transformer, pipe.transformer_2 = experts
        kw = {**wan_inputs(batch=1, frames=5, h=8, w=32), "return_dict": False}
        apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, arm_threshold=0.0, **SPARSE))
        with torch.no_grad():
            ref = [m(**kw)[0] for m in experts]
            enable_context_parallel(pipe, ulysses_degree=world)
            out = [m(**kw)[0] for m in experts]
        from diffusers_attn import get_attention_context

        sharded = [get_attention_context(m).parallel_config is not None and m._parallel_config is not None
                   for m in experts]
        torch.save({"ref": ref, "out": out, "density": get_attention_stats(pipe, log=False).density,
                    "sharded": sharded},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_ulysses_shards_both_experts(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_two_expert_cp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["sharded"] == [True, True]
        assert r["density"] < 1.0 and not torch.equal(r["ref"][0], r["ref"][1])
        for a, b in zip(r["out"], r["ref"]):
            assert rel_err(a, b) <= 1e-5
