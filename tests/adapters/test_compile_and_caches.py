"""torch.compile (custom ops, no graph break, no per-step recompilation) and composition with diffusers caches."""

from __future__ import annotations

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, make_cogvideox, make_hunyuan, rel_err

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.kernels import block_mask_to_lists, block_sparse_attention, block_sparse_attention_table

# dense warm-up step 0 and dense layer 0, then sparse: the step-dependent schedule must work inside the graph
CFG = RainFusionConfig(sparsity=0.75, dense_steps=1, dense_layers=1, min_video_tokens=0, arm_threshold=0.0,
                       block_m=16, block_n=16, num_inference_steps=3)


def _model(name):
    if name == "cogvideox":
        m = make_cogvideox("1.5")
        return m, cogvideox_inputs(m, frames=6)
    return make_hunyuan(), hunyuan_inputs(valid=(5, 12))


def _three_steps(fn, inputs):
    outs = []
    for t in (900, 500, 100):
        kw = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
        with torch.no_grad():
            outs.append(fn(**kw).sample)
    return outs


@pytest.mark.parametrize(
    "name,backend", [("cogvideox", "aot_eager"), ("hunyuan", "aot_eager"), ("cogvideox", "inductor")]
)
def test_compiled_transformer_fullgraph_equals_eager(name, backend):
    model, inputs = _model(name)
    apply_rainfusion(model, CFG)
    eager = _three_steps(model, inputs)
    eager_stats = get_attention_stats(model, log=False)
    apply_rainfusion(model, CFG)  # fresh context and method state
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new step must not retrace
        outs = _three_steps(compiled, inputs)
    stats = get_attention_stats(model, log=False)
    for a, b in zip(outs, eager):
        assert rel_err(a, b) <= (0.0 if backend == "aot_eager" else 1e-5)
    # the hook's step counting and the processors' schedule ran at run time, once per call
    assert stats.steps == 3 and stats.calls == eager_stats.calls
    assert stats.dense_fallbacks == eager_stats.dense_fallbacks
    assert stats.density == pytest.approx(eager_stats.density) and stats.density < 1.0


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan"])
def test_no_graph_breaks(name):
    model, inputs = _model(name)
    apply_rainfusion(model, CFG)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_kernel_entry_points_are_custom_ops_under_compile():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    mask = torch.rand(1, 2, 3, 3, generator=g) < 0.6
    idx, cnt = block_mask_to_lists(mask)
    kpm = torch.ones(1, 40, dtype=torch.bool)
    kpm[0, -5:] = False

    def f(q, k, v):
        a, lse = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, key_padding_mask=kpm,
                                        return_lse=True)
        b = block_sparse_attention_table(q, k, v, idx[0, :1], cnt[0, :1], torch.zeros(1, 2, dtype=torch.int32),
                                         block_m=16, block_n=16)
        return a * 2 + b, lse

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0
    ops = {str(n.target) for gm in explanation.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"diffusers_attn.block_sparse_attention.default",
            "diffusers_attn.block_sparse_attention_table.default"} <= ops, ops
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    ref = f(q, k, v)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --------------------------------------------------------------------------- diffusers caches
def _cache_config(kind, pipe):
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if kind == "fbc":  # a huge threshold: every step after the first reuses the cached residual
        return FirstBlockCacheConfig(threshold=1e6)
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    )


@pytest.mark.parametrize("kind", ["fbc", "pab"])
@pytest.mark.parametrize("name", ["tiny-cogvideox", "tiny-hunyuan"])
def test_rainfusion_composes_with_diffusers_caches(name, kind):
    from diffusers_attn.pipelines.tiny import build_tiny_pipeline

    spec = build_tiny_pipeline(name)
    pipe = spec.pipe
    call = dict(height=64, width=64, num_frames=9, num_inference_steps=4, output_type="pt")

    def gen():
        return pipe(**spec.prompt_kwargs("a red fox"), **call, generator=torch.Generator().manual_seed(0)).frames

    pipe.transformer.enable_cache(_cache_config(kind, pipe))
    cache_only = gen()
    # sparsity 0 under the cache: our processors must not change what the cache computes
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(gen(), cache_only)
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, arm_threshold=0.0,
                                            min_video_tokens=0, block_m=16, block_n=16))
    out = gen()
    stats = get_attention_stats(pipe, log=False)
    n_layers = sum(not k.startswith("context_embedder.") for k in pipe.transformer.attn_processors)
    assert torch.isfinite(out).all() and stats.steps == 4
    assert stats.skipped_calls > 0 and stats.calls + stats.skipped_calls == 4 * n_layers
    assert 0 < stats.density < 1 and "skipped by a cache" in str(stats)
    remove_attention_acceleration(pipe)
    assert torch.equal(gen(), cache_only)
    pipe.transformer.disable_cache()


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan"])
def test_regional_compile_of_blocks_equals_eager(name):
    """Compiling each transformer block alone (the context hook then runs eagerly) gives the eager output."""
    model, inputs = _model(name)
    apply_rainfusion(model, CFG)
    eager = _three_steps(model, inputs)
    apply_rainfusion(model, CFG)
    torch._dynamo.reset()
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(model, attr, []):
            block.compile(fullgraph=True, backend="aot_eager")
    outs = _three_steps(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(outs, eager))
    assert get_attention_stats(model, log=False).density < 1.0
