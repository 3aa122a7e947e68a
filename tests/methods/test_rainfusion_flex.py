"""RainFusion with kernel_backend="flex" (PyTorch FlexAttention, eager on CPU) equals the PyTorch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, make_cogvideox, rel_err

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import DENSE, SPATIAL, TEMPORAL, TEXTURAL, RainFusionMethod
from diffusers_attn.testing import planted_qkv

pytest.importorskip("torch.nn.attention.flex_attention")

SPARSE = {
    "sparsity": 0.75,
    "arm_threshold": 0.0,
    "block_m": 16,
    "block_n": 16,
    "dense_steps": 0,
    "dense_layers": 0,
    "min_video_tokens": 0,
    "num_inference_steps": 10,
}


def _hunyuan16():
    """conftest's tiny HunyuanVideo with head_dim 16 (FlexAttention's minimum)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    ).eval()


def test_mixed_patterns_with_padding_match_torch_backend():
    layout = TokenLayout.video_first((4, 6, 8), 10)
    B, D = 2, 16  # FlexAttention needs head_dim >= 16
    q, k, v = planted_qkv(layout, B, ["spatial", "temporal", "textural", "random"], D)
    kpm = torch.ones(B, layout.seq_len, dtype=torch.bool)
    kpm[0, -3:] = False  # padded text tail
    outs, decisions = {}, {}
    for backend in ("torch", "flex"):
        cfg = RainFusionConfig(**{**SPARSE, "arm_threshold": 0.95}, kernel_backend=backend)
        ctx = AttentionContext(object())  # the method never touches the adapter
        outs[backend] = run_method(
            RainFusionMethod(cfg),
            q,
            k,
            v,
            layout=layout,
            key_padding_mask=kpm,
            scale=None,
            layer_index=0,
            context=ctx,
            dense_fn=lambda: pytest.fail("mixed heads never take the stock path"),
        )
        decisions[backend] = ctx.last_decisions[0].patterns
        assert ctx.stats.kernel_calls == {backend: 1}
    assert np.array_equal(decisions["torch"], decisions["flex"])
    assert set(decisions["torch"].flatten().tolist()) >= {DENSE, SPATIAL, TEMPORAL, TEXTURAL}
    assert rel_err(outs["flex"], outs["torch"]) < 2e-6


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan"])
def test_tiny_model_flex_equals_torch_backend(family):
    if family == "cogvideox":
        model = make_cogvideox()
        inputs = cogvideox_inputs(model)
    else:  # padded text keys in the mask
        model = _hunyuan16()
        inputs = hunyuan_inputs()
    outs = {}
    for backend in ("torch", "flex"):
        apply_rainfusion(model, RainFusionConfig(**SPARSE, kernel_backend=backend))
        with torch.no_grad():
            outs[backend] = model(**inputs).sample
        stats = get_attention_stats(model)
        assert stats.density < 1.0 and stats.kernel_backends == {backend: stats.calls} and stats.calls > 0
        remove_attention_acceleration(model)
    assert torch.isfinite(outs["flex"]).all()
    assert rel_err(outs["flex"], outs["torch"]) < 1e-5


def test_unknown_kernel_backend_is_a_one_line_error():
    with pytest.raises(ValueError, match="'torch', 'triton' or 'flex', got 'cuda'"):
        RainFusionConfig(kernel_backend="cuda")
