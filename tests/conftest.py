"""Shared fixtures: tiny *real* diffusers transformers built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run in the interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN/inf anywhere fails loudly."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in result"
    assert torch.isfinite(b).all(), "non-finite values in reference"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_cogvideox(version: str = "1.0", *, num_layers: int = 2, heads: int = 2, head_dim: int = 16, text_len=8):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    kw = dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=8,
        num_layers=num_layers,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=text_len,
    )
    if version == "1.5":
        kw.update(patch_size_t=2, use_rotary_positional_embeddings=True)
    return CogVideoXTransformer3DModel(**kw).eval()


def cogvideox_inputs(model, batch: int = 2, frames: int = 5, size: int = 8, text_len: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 4, size, size, generator=g)
    e = torch.randn(batch, text_len, 8, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    kw = dict(hidden_states=x, encoder_hidden_states=e, timestep=t)
    if model.config.use_rotary_positional_embeddings:
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        n = (frames // pt) * (size // p) ** 2
        d = model.config.attention_head_dim
        kw["image_rotary_emb"] = (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    return kw


def make_hunyuan(*, num_layers: int = 1, num_single_layers: int = 1, heads: int = 2, head_dim: int = 10):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()


def hunyuan_inputs(batch: int = 2, frames: int = 4, size: int = 8, text_len: int = 12, valid=(7, 12), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text_len, dtype=torch.bool)
    for b in range(batch):
        mask[b, : valid[b % len(valid)]] = True
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g),
        guidance=torch.full((batch,), 3.0),
    )


@pytest.fixture
def tiny_cogvideox():
    return make_cogvideox()


@pytest.fixture
def tiny_hunyuan():
    return make_hunyuan()


def make_wan(*, num_layers: int = 1, heads: int = 2, head_dim: int = 12, image: bool = False, vace: bool = False,
             in_channels: int = 4):
    """A tiny ``WanTransformer3DModel`` (``image``: I2V/FLF2V cross-attention to CLIP tokens; ``vace``: the VACE
    variant with one control block)."""
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    torch.manual_seed(0)
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32)
    if image:
        kw.update(image_dim=8, added_kv_proj_dim=heads * head_dim)
    if vace:
        return WanVACETransformer3DModel(**kw, vace_layers=[0], vace_in_channels=6).eval()
    return WanTransformer3DModel(**kw).eval()


def wan_inputs(batch: int = 2, frames: int = 5, h: int = 8, w: int = 16, text_len: int = 7, seed: int = 1,
               model=None):
    """Latents (B, C, F, h, w) -> grid (F, h/2, w/2); I2V adds 4 image tokens, VACE a control video."""
    g = torch.Generator().manual_seed(seed)
    c = model.config.in_channels if model is not None else 4
    kw = dict(hidden_states=torch.randn(batch, c, frames, h, w, generator=g),
              timestep=torch.full((batch,), 500, dtype=torch.long),
              encoder_hidden_states=torch.randn(batch, text_len, 16, generator=g))
    if model is not None and model.config.image_dim:
        # the stock cross-attention splits off everything before the last 512 tokens as image tokens
        kw["encoder_hidden_states"] = torch.randn(batch, 512, 16, generator=g)
        kw["encoder_hidden_states_image"] = torch.randn(batch, 4, 8, generator=g)
    if model is not None and getattr(model.config, "vace_in_channels", None):
        kw["control_hidden_states"] = torch.randn(batch, 6, frames, h, w, generator=g)
    return kw
