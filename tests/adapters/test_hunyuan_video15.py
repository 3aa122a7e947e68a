"""RainFusion on diffusers' HunyuanVideo15Transformer3DModel (tiny configs): exactness at sparsity 0, removal,
each pattern against dense attention with its explicit mask (tile order, odd grids, image tokens), what the patterns
and the padding exclude, batch elements, rf2, a diffusers cache, and Ulysses degree 2."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import rel_err
from hv15_tiny import hunyuan_video15_inputs, make_hunyuan_video15, valid_conditioning

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.adapters import HunyuanVideo15AttnProcessor, get_adapter
from diffusers_attn.kernels import masked_attention_reference
from diffusers_attn.methods.rainfusion import SPATIAL, TEMPORAL, TEXTURAL, RainFusionMethod

SPARSE = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, num_inference_steps=10, block_m=16, block_n=16)
PATTERN_IDS = {"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


class ExplicitMaskOracle(RainFusionMethod):
    """The forced pattern as dense fp64 attention with the (N, N) mask the plan executes, AND the key mask: what
    the sparse path must equal. Same layout and token order as the real method (it is one)."""

    def attend(self, q, k, v, *, layout, key_padding_mask, scale, call, dense_fn):
        self.calls = getattr(self, "calls", 0) + 1
        mask = self.plan(layout).token_mask(PATTERN_IDS[self.config.force_pattern])[None, None]
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :]
        return masked_attention_reference(q.double(), k.double(), v.double(), mask, scale).to(q.dtype), None


# --------------------------------------------------------------------------- sparsity 0 / removal
@pytest.mark.parametrize("image", [False, True], ids=["t2v", "image-tokens"])
def test_sparsity0_equals_stock_and_refiner_untouched(image):
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs(image=image)
    ref = run(model, inputs)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.0, num_inference_steps=10))
    procs = model.attn_processors
    refiner = [k for k in procs if k.startswith("context_embedder.")]
    assert refiner and all(type(procs[k]).__name__ == "AttnProcessor2_0" for k in refiner)
    assert sum(isinstance(p, HunyuanVideo15AttnProcessor) for p in procs.values()) == 2
    assert torch.equal(run(model, inputs), ref)
    stats = get_attention_stats(model, log=False)
    assert stats.dense_fallbacks == {"sparsity=0": 2} and stats.density == 1.0


@pytest.mark.parametrize("mode", ["rf1", "rf2"])
def test_remove_restores_stock_and_apply_twice(mode):
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs()
    ref = run(model, inputs)
    originals = {k: type(v) for k, v in model.attn_processors.items()}
    cfg = RainFusionConfig(mode=mode, sparsity=0.75, arm_threshold=0.0, **SPARSE)
    apply_rainfusion(model, cfg)
    apply_rainfusion(model, cfg)  # replaces, does not stack
    out = run(model, inputs)
    assert not torch.equal(out, ref) and rel_err(out, ref) < 0.5
    assert get_attention_stats(model, log=False).density < 1.0
    assert remove_attention_acceleration(model) is True
    assert {k: type(v) for k, v in model.attn_processors.items()} == originals
    assert torch.equal(run(model, inputs), ref)


def test_latent_grid_from_patch_sizes_and_unsupported_mask():
    model = make_hunyuan_video15()
    adapter = get_adapter(model)
    assert adapter.name == "hunyuan_video15"
    model.register_to_config(patch_size=2, patch_size_t=1)
    assert adapter.latent_grid(model, {"hidden_states": torch.zeros(1, 4, 5, 8, 12)}) == (5, 4, 6)
    model.register_to_config(patch_size=1, patch_size_t=1)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.5, **SPARSE))
    attn = model.transformer_blocks[0].attn
    with pytest.raises(ValueError, match="needs the conditioning mask"):
        attn.processor(attn, torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), attention_mask=None)


# --------------------------------------------------------------------------- each pattern == explicit mask
@pytest.mark.parametrize("force", ["spatial", "temporal", "textural"])
@pytest.mark.parametrize(
    "grid,image,order",
    [((5, 8, 8), False, "tiles"), ((5, 7, 9), True, "tiles"), ((5, 11, 13), False, "raster")],
    ids=["tiles", "odd-grid-image-tokens", "raster-odd"],
)
def test_pattern_equals_dense_attention_with_its_explicit_mask(force, grid, image, order):
    """Two dual-stream layers (the second sees what the first's sparse output made of the padded tokens), batch 2
    with different padding: the sparse model equals the same model whose attention is dense fp64 with the plan's
    explicit mask AND the key mask."""
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs(frames=grid[0], height=grid[1], width=grid[2], image=image)
    cfg = RainFusionConfig(sparsity=0.6, force_pattern=force, textural_stride=2, token_order=order, **SPARSE)
    ctx = apply_rainfusion(model, cfg)
    out = run(model, inputs)
    assert (ctx.token_order is not None) == (order == "tiles")
    stats = get_attention_stats(model, log=False)
    assert {k: n for k, n in stats.pattern_histogram.items() if n} == {force: 2 * 2 * 2} and stats.video_density < 1.0
    oracle = ExplicitMaskOracle(cfg)
    from diffusers_attn.install import install_method

    install_method(model, oracle, num_inference_steps=10)
    ref = run(model, inputs)
    assert oracle.calls == 2
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- what is excluded cannot matter
def test_spatial_window0_isolates_frames_in_tile_order():
    """One layer, spatial w=0, 16-token blocks = 1 x 2 x 8 tiles (4 per frame): a query of frame 1 sees frames 0
    and 1 and the conditioning only, so perturbing frame 3 leaves frames 1, 2 and 4 bit-identical."""
    model = make_hunyuan_video15(num_layers=1)
    inputs = hunyuan_video15_inputs(batch=1, frames=5, valid=(6,), valid_2=(2,))
    cfg = RainFusionConfig(sparsity=0.75, force_pattern="spatial", spatial_window=0, **SPARSE)
    ctx = apply_rainfusion(model, cfg)
    a = run(model, inputs)
    assert ctx.token_order == (1, 2, 8)
    poked = {**inputs, "hidden_states": inputs["hidden_states"].clone()}
    poked["hidden_states"][0, :, 3] += 1.0
    b = run(model, poked)
    for f in (1, 2, 4):
        assert torch.equal(a[:, :, f], b[:, :, f]), f
    assert not torch.equal(a[:, :, 3], b[:, :, 3]) and not torch.equal(a[:, :, 0], b[:, :, 0])
    remove_attention_acceleration(model)
    c, d = run(model, inputs), run(model, poked)
    assert not torch.equal(c[:, :, 1], d[:, :, 1])  # the stock model mixes every frame


@pytest.mark.parametrize("force", ["spatial", "temporal", "textural", None])
def test_padded_conditioning_is_never_attended(force):
    """The padded conditioning tokens are nonzero inside the network (after the first block); changing them where
    the second block receives them changes nothing, in the stock model and under every pattern and ARM."""
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs(batch=2, valid=(4, 7), valid_2=(0, 3))
    n_valid = valid_conditioning(inputs)

    def poke(module, args):  # the model calls its blocks positionally: (video, conditioning, temb, mask, rope)
        e = args[1].clone()
        for b, n in enumerate(n_valid):
            e[b, n:] += 10.0 * (b + 1)
        return (args[0], e, *args[2:])

    def both():
        plain = run(model, inputs)
        handle = model.transformer_blocks[1].register_forward_pre_hook(poke)
        try:
            poked = run(model, inputs)
        finally:
            handle.remove()
        return plain, poked

    a, b = both()
    assert torch.equal(a, b)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.75, force_pattern=force, arm_threshold=0.0,
                                             textural_stride=2, **SPARSE))
    a, b = both()
    assert torch.equal(a, b), force
    assert get_attention_stats(model, log=False).density < 1.0


def test_batch_elements_decide_independently():
    """ARM per batch element (argmax at threshold 0: every head sparse with its own best pattern), different
    padding per element: the batch equals each element run alone."""
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs(batch=2, valid=(3, 10), valid_2=(1, 6))
    cfg = RainFusionConfig(sparsity=0.75, arm_threshold=0.0, arm_rule="argmax", **SPARSE)
    apply_rainfusion(model, cfg)
    both = run(model, inputs)
    assert get_attention_stats(model, log=False).pattern_histogram.get("fallback", 0) == 0
    for b in range(2):
        single = {k: v[b : b + 1] for k, v in inputs.items()}
        assert rel_err(run(model, single), both[b : b + 1]) < 1e-5


def test_rf2_runs_and_is_exact_at_sparsity0():
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs(frames=5, height=7, width=9, image=True)
    ref = run(model, inputs)
    apply_rainfusion(model, RainFusionConfig(mode="rf2", sparsity=0.0, **SPARSE))
    assert torch.equal(run(model, inputs), ref)
    apply_rainfusion(model, RainFusionConfig(mode="rf2", sparsity=0.6, **SPARSE))
    out = run(model, inputs)
    stats = get_attention_stats(model, log=False)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.5
    assert {k: n for k, n in stats.pattern_histogram.items() if n} == {"rf2": 2 * 2 * 2} and stats.video_density < 1.0


# --------------------------------------------------------------------------- Ulysses degree 2
def _cp_worker(rank: int, world: int, init_file: str, out_dir: str, runs: tuple) -> None:

    from diffusers_attn import get_attention_context
    from diffusers_attn.parallel import enable_context_parallel

    from _gloo import gloo_rank

    with gloo_rank(init_file, rank, world):
        for mode, sparsity in runs:
            m = make_hunyuan_video15(heads=4, head_dim=8)
            inputs = hunyuan_video15_inputs(batch=2, frames=4, height=8, width=8, valid=(4, 10), valid_2=(0, 3),
                                            image=True)
            cfg = RainFusionConfig(mode=mode, sparsity=sparsity, arm_threshold=0.0, arm_rule="argmax", **SPARSE)
            apply_rainfusion(m, cfg)
            ctx = get_attention_context(m)
            with torch.no_grad():
                ref = m(**inputs).sample
                ref_dec = {k: v.patterns.copy() for k, v in ctx.last_decisions.items() if hasattr(v, "patterns")}
                enable_context_parallel(m, ulysses_degree=world)
                out = m(**inputs).sample
            dec = {k: (v.patterns.copy(), v.head_offset) for k, v in ctx.last_decisions.items()
                   if hasattr(v, "patterns")}
            torch.save({"ref": ref, "out": out, "ref_dec": ref_dec, "dec": dec, "token_order": ctx.token_order,
                        "density": ctx.stats.summary().density},
                       os.path.join(out_dir, f"{mode}-{sparsity}-rank{rank}.pt"))


def test_ulysses_degree2_equals_single_process(tmp_path):
    """2 gloo processes, Ulysses degree 2 (the package's video-only plan: diffusers ships none for this model),
    tile order, image tokens and per-element padding: output and per-head decisions equal the single process."""
    runs = (("rf1", 0.0), ("rf1", 0.75), ("rf2", 0.6))
    mp.start_processes(_cp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), runs), nprocs=2, join=True,
                       start_method="spawn")
    for (mode, sparsity), rank in ((run_, r) for run_ in runs for r in range(2)):
        r = torch.load(tmp_path / f"{mode}-{sparsity}-rank{rank}.pt", weights_only=False)
        assert rel_err(r["out"], r["ref"]) <= 1e-5, (sparsity, rank)
        if sparsity == 0:
            continue
        assert r["density"] < 1.0 and r["token_order"] == (1, 2, 8)
        if mode == "rf1":
            assert r["ref_dec"] and len({int(p) for d in r["ref_dec"].values() for p in d.flatten()}) >= 2
            for layer, (pat, off) in r["dec"].items():
                h = pat.shape[1]
                assert off == rank * h
                assert np.array_equal(pat, r["ref_dec"][layer][:, off : off + h]), (rank, layer)


# --------------------------------------------------------------------------- a diffusers cache
def test_composes_with_pyramid_attention_broadcast():
    """PAB (diffusers' cache that supports this model; FirstBlockCache does not register its block) skips
    attention calls around our processors; sparsity 0 under the cache equals the cache alone."""
    from diffusers import PyramidAttentionBroadcastConfig

    from diffusers_attn.pipelines.tiny import build_tiny_pipeline

    spec = build_tiny_pipeline("tiny-hunyuanvideo-1.5")
    pipe = spec.pipe

    def gen():
        return pipe(**spec.prompt_kwargs("a red fox"), height=64, width=64, num_frames=9, num_inference_steps=3,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep))
    cache_only = gen()
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(gen(), cache_only)
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, arm_threshold=0.0,
                                            min_video_tokens=0, block_m=16, block_n=16))
    out = gen()
    stats = get_attention_stats(pipe, log=False)
    assert torch.isfinite(out).all() and stats.skipped_calls > 0
    assert stats.calls + stats.skipped_calls == 3 * 2 * 2  # steps x (cond, uncond) x layers
    remove_attention_acceleration(pipe)
    assert torch.equal(gen(), cache_only)


def test_plan_shapes_match_the_diffusers_defaults():
    """`diffusers-attn plan`'s HunyuanVideo-1.5 rows are the released config (diffusers' defaults, which the hub
    configs keep: only target_size / task_type differ per checkpoint) and the pipeline's default 16:9 sizes."""
    import inspect

    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    from diffusers_attn.model_shapes import get_model_shape

    tr = {k: p.default for k, p in inspect.signature(HunyuanVideo15Transformer3DModel.__init__).parameters.items()}
    vae = {k: p.default for k, p in inspect.signature(AutoencoderKLHunyuanVideo15.__init__).parameters.items()}
    sizes = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for name, target in (("hunyuanvideo-1.5-480p", 640), ("hunyuanvideo-1.5-720p", 960)):
        s = get_model_shape(name)
        assert (s.heads, s.head_dim, s.layers) == (tr["num_attention_heads"], tr["attention_head_dim"],
                                                   tr["num_layers"])
        assert (s.patch_t, s.patch_hw) == (tr["patch_size_t"], tr["patch_size"])
        assert (s.vae_temporal, s.vae_spatial) == (vae["temporal_compression_ratio"], vae["spatial_compression_ratio"])
        assert s.default_video[1:] == sizes.calculate_default_height_width(9, 16, target)
        assert s.text_len == 1000 + 256 + 729 and s.text_position == "last"


def test_regional_compile_of_blocks_equals_eager():
    """The stock forward has data-dependent branches (text-to-video detection, boolean-mask reordering of the
    conditioning), so the whole transformer does not compile in one graph; each block does, with our attention as
    one custom op, and equals eager over a dense warm-up step and two sparse steps."""
    model = make_hunyuan_video15()
    inputs = hunyuan_video15_inputs()
    cfg = RainFusionConfig(sparsity=0.75, arm_threshold=0.0, **{**SPARSE, "dense_steps": 1, "dense_layers": 1,
                                                                "num_inference_steps": 3})

    def three_steps():
        return [run(model, {**inputs, "timestep": torch.full((2,), t)}) for t in (900.0, 500.0, 100.0)]

    apply_rainfusion(model, cfg)
    eager = three_steps()
    apply_rainfusion(model, cfg)
    torch._dynamo.reset()
    for block in model.transformer_blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(three_steps(), eager))
    assert get_attention_stats(model, log=False).density < 1.0
