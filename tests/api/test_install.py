"""The one install path: every method installs, reports and is removed the same way; replaced processors are never
silent; ``apply`` dispatches on the config type."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import cogvideox_inputs, make_cogvideox, rel_err
from var_tiny import tiny_pipe

from diffusers_attn import (
    FEATConfig,
    LiteVARConfig,
    LiteVARMaskSet,
    RainFusionConfig,
    apply,
    apply_litevar,
    apply_rainfusion,
    get_attention_stats,
    remove_attention_acceleration,
)
from diffusers_attn.install import installed_state
from diffusers_attn.methods.feat import FEATMethod
from diffusers_attn.methods.litevar import LiteVARMethod
from diffusers_attn.methods.rainfusion import RainFusionMethod

SPARSE = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, num_inference_steps=10, arm_threshold=0.0,
              block_m=16, block_n=16, sparsity=0.75)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_apply_dispatches_on_the_config_type():
    model = make_cogvideox()
    for cfg, cls in ((RainFusionConfig(sparsity=0.5, num_inference_steps=4), RainFusionMethod), (FEATConfig(), FEATMethod)):
        apply(model, cfg)
        assert isinstance(installed_state(model).method, cls)
    assert remove_attention_acceleration(model) and installed_state(model) is None
    with pytest.raises(TypeError, match="RainFusionConfig, FEATConfig, LiteVARConfig"):
        apply(model, {"sparsity": 0.5})


def test_methods_refuse_models_of_another_layout_before_installing():
    pipe = tiny_pipe((1, 2, 3, 4, 6))
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="unsupported transformer class VARTransformer; supported: CogVideoX"):
        apply_rainfusion(pipe.transformer, RainFusionConfig(num_inference_steps=4))
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    with pytest.raises(TypeError, match="VARPipeline or VARTransformer"):
        apply_litevar(make_cogvideox(), LiteVARConfig())


def test_litevar_goes_through_the_one_install_path():
    """remove_attention_acceleration removes LiteVAR (processors and quantized linears); its stats name the
    windowed and CFG-shared heads instead of calling every head dense."""
    pn = (1, 2, 3, 4, 6)
    pipe = tiny_pipe(pn)
    tr = pipe.transformer
    gen = lambda: pipe([3, 9], top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0),  # noqa: E731
                       output_type="latent").images
    ref = gen()
    widths = {k: torch.ones(2, 2, len(s), dtype=torch.int16) for k, s in LiteVARMaskSet.full(pn, 2, 2).maskable.items()}
    masks = LiteVARMaskSet(pn, 2, 2, widths)  # width-1 bands on every maskable segment
    ctx = apply_litevar(pipe, LiteVARConfig(masks=masks, share_cfg_attention=True, quant="w8a8"))
    assert isinstance(installed_state(pipe).method, LiteVARMethod) and ctx.stats.method == "litevar"
    assert type(tr.blocks[0].ffn.fc1).__name__ == "FakeQuantLinear"
    gen()
    st = get_attention_stats(pipe, log=False)
    assert st.steps == len(pn) and st.calls == len(pn) * 2
    hist = st.pattern_histogram
    # scales 0-2 have nothing maskable (full, shared); scales 3-4 are windowed on every head and shared
    # scale x block x (CFG batch 4 x 2 heads)
    assert hist["cfg_shared"] == 3 * 2 * 4 * 2 and hist["windowed+cfg_shared"] == 2 * 2 * 4 * 2, hist
    assert hist.get("full", 0) == 0 and hist.get("windowed", 0) == 0
    assert st.kernel_backends == {"sdpa": 6, "masked_sdpa": 4}
    assert "W" not in str(st) or "windowed" in str(st)
    gen()  # a second generation starts the stats afresh (scale 0 of block 0)
    assert get_attention_stats(pipe, log=False).calls == len(pn) * 2
    assert remove_attention_acceleration(pipe)
    assert type(tr.blocks[0].ffn.fc1) is torch.nn.Linear
    assert torch.equal(gen(), ref)
    assert not remove_attention_acceleration(pipe)


def test_fuse_qkv_projections_keeps_rainfusion_installed(caplog):
    model = make_cogvideox()
    kw = cogvideox_inputs(model, frames=5)
    apply_rainfusion(model, RainFusionConfig(**SPARSE, force_pattern="spatial"))
    ref = run(model, kw)
    dense = get_attention_stats(model, log=False).video_density
    assert dense < 1.0
    with caplog.at_level(logging.INFO, logger="diffusers_attn"):
        model.fuse_qkv_projections()  # diffusers installs its fused processor on every layer
        out = run(model, kw)
    assert rel_err(out, ref) < 1e-5  # still the sparse computation, now on fused projections
    st = get_attention_stats(model, log=False)
    assert st.video_density == pytest.approx(dense) and st.info["reinstalled_processors"] == 2
    assert "re-installed" in caplog.text
    model.unfuse_qkv_projections()
    assert rel_err(run(model, kw), ref) < 1e-5
    assert remove_attention_acceleration(model)


def test_a_foreign_processor_is_named_in_the_stats(caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = make_cogvideox()
    kw = cogvideox_inputs(model, frames=5)
    apply_rainfusion(model, RainFusionConfig(**SPARSE, force_pattern="spatial"))
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor2_0())
    with caplog.at_level(logging.WARNING, logger="diffusers_attn"):
        try:
            run(model, kw)
        except Exception:
            pass  # the foreign processor may not even fit the model; the point is what was reported first
    assert "another processor" in caplog.text
    st = get_attention_stats(model, log=False)
    assert st.info["foreign_processors"] == ["transformer_blocks.1.attn1.processor (AttnProcessor2_0)"]
