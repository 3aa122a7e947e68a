"""RainFusion on real diffusers transformers (tiny configs): exactness, token-dependency semantics, install/remove."""

from __future__ import annotations

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, make_cogvideox, make_hunyuan, rel_err

from diffusers_attn import (
    CogVideoXAttnProcessor,
    RainFusionConfig,
    RainFusionMethod,
    apply_rainfusion,
    attach_attention_context,
    get_attention_stats,
    remove_attention_acceleration,
)

SPARSE = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, num_inference_steps=10)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


# --------------------------------------------------------------------------- sparsity=0 is the stock computation
@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_cogvideox_sparsity0_equals_stock(version):
    model = make_cogvideox(version)
    inputs = cogvideox_inputs(model, frames=6 if version == "1.5" else 5)
    ref = run(model, inputs)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.0, num_inference_steps=10))
    out = run(model, inputs)
    assert torch.equal(out, ref)
    stats = get_attention_stats(model)
    assert stats.dense_fallbacks == {"sparsity=0": model.config.num_layers}
    assert stats.density == 1.0


def test_hunyuan_sparsity0_equals_stock_and_refiner_untouched(tiny_hunyuan):
    inputs = hunyuan_inputs()
    ref = run(tiny_hunyuan, inputs)
    apply_rainfusion(tiny_hunyuan, RainFusionConfig(sparsity=0.0, num_inference_steps=10))
    procs = tiny_hunyuan.attn_processors
    refiner = [k for k in procs if k.startswith("context_embedder.")]
    assert refiner and all(type(procs[k]).__name__ == "AttnProcessor2_0" for k in refiner)
    assert sum(type(p).__name__ == "HunyuanVideoAttnProcessor" for p in procs.values()) == 2
    assert torch.equal(run(tiny_hunyuan, inputs), ref)


def test_sparse_runs_and_reports_density(tiny_cogvideox, tiny_hunyuan):
    for model, inputs in ((tiny_cogvideox, cogvideox_inputs(tiny_cogvideox)), (tiny_hunyuan, hunyuan_inputs())):
        ref = run(model, inputs)
        apply_rainfusion(model, RainFusionConfig(sparsity=0.75, arm_threshold=0.0, block_m=16, block_n=16, **SPARSE))
        out = run(model, inputs)
        assert torch.isfinite(out).all() and out.shape == ref.shape
        stats = get_attention_stats(model)
        assert stats.density < 1.0 and stats.video_density < 1.0
        assert stats.pattern_histogram.get("fallback", 0) == 0
        assert "arm" in stats.timings_ms and "attention" in stats.timings_ms
        assert stats.kernel_backends == {"torch": stats.calls} and not stats.slow_path  # CPU: the exact torch path
        assert "sparse kernels: torch=" in str(stats)
        assert len(stats.layers) == len(model.attn_processors) - (1 if model is tiny_hunyuan else 0)


# --------------------------------------------------------------------------- semantics through the whole model
def _perturbed(inputs, key, index, amount=3.0):
    out = dict(inputs)
    x = inputs[key].clone()
    x[index] += amount
    out[key] = x
    return out


def test_cogvideox_spatial_window0_isolates_frames():
    """With w=0 a query in frame t >= 1 sees only frames {0, t} and text: perturbing frame 3 leaves frame 1."""
    model = make_cogvideox("1.0", num_layers=1)
    inputs = cogvideox_inputs(model, batch=1, frames=5, size=8, text_len=8)  # 4x4 tokens/frame, text 8
    # 8-token blocks: text and every frame boundary fall on block boundaries, so block rounding adds nothing.
    cfg = RainFusionConfig(force_pattern="spatial", spatial_window=0, block_m=8, block_n=8, **SPARSE)
    apply_rainfusion(model, cfg)
    a = run(model, inputs)
    b = run(model, _perturbed(inputs, "hidden_states", (0, 3)))
    assert torch.equal(a[:, 1], b[:, 1]) and torch.equal(a[:, 2], b[:, 2])
    assert not torch.equal(a[:, 3], b[:, 3]) and not torch.equal(a[:, 0], b[:, 0])  # F0 rows stay dense
    remove_attention_acceleration(model)
    c, d = run(model, inputs), run(model, _perturbed(inputs, "hidden_states", (0, 3)))
    assert not torch.equal(c[:, 1], d[:, 1])  # the stock model does mix all frames


@pytest.mark.parametrize("dual,single", [(1, 0), (0, 1)])
def test_hunyuan_temporal_rows0_isolates_rows(dual, single):
    """r_h=0: a query at row h sees row h of every frame (+ first frame and text). Raster order, where a block of
    8 tokens is exactly one row of the 8x8 frame (in tile order a block is a box spanning rows)."""
    model = make_hunyuan(num_layers=dual, num_single_layers=single)
    inputs = hunyuan_inputs(batch=1, frames=4, size=8, text_len=12, valid=(12,))
    cfg = RainFusionConfig(force_pattern="temporal", temporal_rows=0, token_order="raster", block_m=8, block_n=8,
                           **SPARSE)
    apply_rainfusion(model, cfg)
    a = run(model, inputs)
    b = run(model, _perturbed(inputs, "hidden_states", (0, slice(None), 2, 5)))  # frame 2, row 5
    rows = [r for r in range(8) if r != 5]
    assert torch.equal(a[:, :, 1:, rows], b[:, :, 1:, rows])
    assert not torch.equal(a[:, :, 1:, 5], b[:, :, 1:, 5])


def test_hunyuan_textural_isolates_non_strided_keys(tiny_hunyuan):
    """Textural (stride 2): a non-strided token of frame 2 is seen only by itself and the dense rows."""
    inputs = hunyuan_inputs(batch=1, frames=4, size=8, valid=(12,))
    cfg = RainFusionConfig(force_pattern="textural", textural_stride=2, block_m=8, block_n=8, **SPARSE)
    model = make_hunyuan(num_layers=1, num_single_layers=0)
    apply_rainfusion(model, cfg)
    a = run(model, inputs)
    b = run(model, _perturbed(inputs, "hidden_states", (0, slice(None), 2, 3, 3)))  # odd row/col: not strided
    changed = (a != b).any(dim=1)[0]  # (F, H, W)
    assert changed[2, 3, 3]
    assert changed[0].any()  # first-frame rows are dense
    changed[2, 3, 3] = False
    changed[0] = False
    assert not changed.any()


def test_hunyuan_padded_text_never_attended():
    model = make_hunyuan()
    inputs = hunyuan_inputs(batch=2, valid=(5, 9))
    poke = dict(inputs)
    e = inputs["encoder_hidden_states"].clone()
    e[0, 5:] += 10.0
    e[1, 9:] -= 10.0
    poke["encoder_hidden_states"] = e
    assert torch.equal(run(model, inputs), run(model, poke))  # stock model: padded text is masked
    for force in ("spatial", "temporal", "textural", None):
        cfg = RainFusionConfig(force_pattern=force, arm_threshold=0.0, block_m=16, block_n=16, **SPARSE)
        apply_rainfusion(model, cfg)
        assert torch.equal(run(model, inputs), run(model, poke)), force
        assert get_attention_stats(model).density < 1.0


# --------------------------------------------------------------------------- install / remove
def test_remove_restores_bit_identical_and_apply_twice(tiny_hunyuan):
    inputs = hunyuan_inputs()
    ref = run(tiny_hunyuan, inputs)
    originals = dict(tiny_hunyuan.attn_processors)
    cfg = RainFusionConfig(sparsity=0.75, arm_threshold=0.0, block_m=16, block_n=16, **SPARSE)
    apply_rainfusion(tiny_hunyuan, cfg)
    apply_rainfusion(tiny_hunyuan, cfg)  # replaces, does not stack
    assert len(tiny_hunyuan._diffusers_hook.hooks) == 1
    assert not torch.equal(run(tiny_hunyuan, inputs), ref)
    assert remove_attention_acceleration(tiny_hunyuan) is True
    assert remove_attention_acceleration(tiny_hunyuan) is False
    assert {k: type(v) for k, v in tiny_hunyuan.attn_processors.items()} == {
        k: type(v) for k, v in originals.items()
    }
    assert "diffusers_attn_context" not in tiny_hunyuan._diffusers_hook.hooks
    assert torch.equal(run(tiny_hunyuan, inputs), ref)
    with pytest.raises(ValueError, match="no accelerated attention"):
        get_attention_stats(tiny_hunyuan)


def test_manual_set_attn_processor_dict_form(tiny_cogvideox):
    """The by-hand route of docs/rainfusion.md: context hook + per-layer processors through set_attn_processor."""
    inputs = cogvideox_inputs(tiny_cogvideox)
    ref = run(tiny_cogvideox, inputs)
    ctx = attach_attention_context(tiny_cogvideox, num_inference_steps=10)
    method = RainFusionMethod(RainFusionConfig(sparsity=0.75, arm_threshold=0.0, block_m=16, block_n=16, **SPARSE))
    procs = dict(tiny_cogvideox.attn_processors)
    layers = [k for k in procs if k.startswith("transformer_blocks.")]
    procs.update({k: CogVideoXAttnProcessor(method, layer_index=i, context=ctx) for i, k in enumerate(layers)})
    tiny_cogvideox.set_attn_processor(procs)
    out = run(tiny_cogvideox, inputs)
    assert ctx.stats.summary().density < 1.0
    assert rel_err(out, ref) < 1.0 and not torch.equal(out, ref)
    # without a context the processor explains what is missing
    tiny_cogvideox.set_attn_processor(CogVideoXAttnProcessor(method, layer_index=0))
    with pytest.raises(RuntimeError, match="attach_attention_context"):
        run(tiny_cogvideox, inputs)


def test_fused_qkv_cogvideox_matches_unfused():
    model = make_cogvideox()
    inputs = cogvideox_inputs(model)
    cfg = RainFusionConfig(sparsity=0.75, force_pattern="temporal", block_m=16, block_n=16, **SPARSE)
    apply_rainfusion(model, cfg)
    a = run(model, inputs)
    remove_attention_acceleration(model)
    model.fuse_qkv_projections()
    apply_rainfusion(model, cfg)
    b = run(model, inputs)
    assert rel_err(b, a) < 1e-5


def test_unsupported_inputs_are_clear_errors(tiny_cogvideox):
    with pytest.raises(ValueError, match="supported: CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel"):
        apply_rainfusion(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pipeline"):
        apply_rainfusion(object())
    with pytest.raises(TypeError, match="RainFusionConfig"):
        apply_rainfusion(tiny_cogvideox, {"sparsity": 0.5})
    with pytest.raises(ValueError, match="fraction of the run"):
        apply_rainfusion(tiny_cogvideox, RainFusionConfig(dense_steps=0.25))
    from diffusers.models.attention_processor import AttnProcessor2_0

    tiny_cogvideox.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="non-stock processors"):
        apply_rainfusion(tiny_cogvideox, RainFusionConfig(num_inference_steps=4))


def test_short_video_falls_back_with_reason(tiny_cogvideox):
    inputs = cogvideox_inputs(tiny_cogvideox)
    ref = run(tiny_cogvideox, inputs)
    apply_rainfusion(tiny_cogvideox, RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0,
                                                      num_inference_steps=10))  # default min_video_tokens=4096
    assert torch.equal(run(tiny_cogvideox, inputs), ref)
    stats = get_attention_stats(tiny_cogvideox)
    (reason,) = stats.dense_fallbacks
    assert "min_video_tokens=4096" in reason and stats.dense_fallback_rate == 1.0


def test_batch_elements_decide_independently():
    """ARM runs per batch element: a batch of two different inputs equals the two run alone (argmax at threshold
    0: every head sparse with its own best pattern, so the choice depends on the input)."""
    model = make_hunyuan()
    inputs = hunyuan_inputs(batch=2, valid=(6, 12))
    cfg = RainFusionConfig(sparsity=0.75, arm_threshold=0.0, arm_rule="argmax", block_m=16, block_n=16, **SPARSE)
    apply_rainfusion(model, cfg)
    both = run(model, inputs)
    for b in range(2):
        single = {k: v[b : b + 1] for k, v in inputs.items()}
        assert rel_err(run(model, single), both[b : b + 1]) < 1e-5


# --------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("force", ["spatial", None], ids=["forced-spatial", "arm"])
def test_backward_through_sparse_cogvideox(force):
    """A bare transformer called without no_grad (training, gradient probing): the forward runs sparse and
    loss.backward() reaches every parameter; ARM (force None) builds no graph of its own."""
    model = make_cogvideox()
    inputs = cogvideox_inputs(model)
    # argmax at threshold 0: ARM keeps every head sparse (on this tiny grid the density-aware rule keeps them dense)
    cfg = RainFusionConfig(sparsity=0.75, force_pattern=force, arm_threshold=0.0, arm_rule="argmax", block_m=16,
                           block_n=16, **SPARSE)
    apply_rainfusion(model, cfg)
    loss = model(**inputs).sample.square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    qkv = model.transformer_blocks[0].attn1.to_q.weight.grad
    assert qkv.abs().sum() > 0
    stats = get_attention_stats(model, log=False)
    assert stats.density < 1.0 and stats.pattern_histogram.get("fallback", 0) == 0
    if force == "spatial":
        assert stats.pattern_histogram["spatial"] == sum(stats.pattern_histogram.values())


@pytest.mark.parametrize("mode", ["rf1", "rf2"])
def test_sparse_call_with_padding_mask_under_inference_mode(mode):
    """Under torch.inference_mode the padding mask has no version counter: nothing derived from it may be cached
    by version (that raised), and the output equals the no_grad run."""
    model = make_hunyuan()
    kw = hunyuan_inputs(frames=5, size=16)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.5, mode=mode, dense_steps=0, dense_layers=0,
                                             min_video_tokens=0, block_m=16, block_n=16, num_inference_steps=10,
                                             arm_threshold=0.0, arm_rule="argmax"))
    ref = run(model, kw)
    with torch.inference_mode():
        out = model(**kw).sample
    assert get_attention_stats(model, log=False).video_density < 1.0
    assert rel_err(out.clone(), ref) < 1e-6
