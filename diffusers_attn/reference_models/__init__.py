"""Small *trained* reference video models, shipped with the package (offline quality fixtures and demo default).

* ``ref-cogvideox``: a stock ``CogVideoXTransformer3DModel`` (4 layers, 6 heads x 16, RoPE) run by the stock
  ``CogVideoXPipeline`` with the stock ``CogVideoXDDIMScheduler`` (v-prediction, zero-terminal-SNR, like
  CogVideoX-2B), trained on :mod:`.data` clips (9 frames, 32x32) with :mod:`.train`.

The autoencoder is the fixed pixel-space :class:`.autoencoder.PixelShuffleAutoencoder` (no weights, lossless), so
the latent grid is the video's own: 9 latent frames x 8 x 8 tokens (patch 2 over the 16x16 space-to-depth latent).
Prompts become fixed word embeddings (:func:`diffusers_attn.pipelines.tiny.prompt_embeddings`); the vocabulary is
the caption grammar of :mod:`.data` (other words get vectors the model never saw).

* ``ref-hunyuan``: a stock ``HunyuanVideoTransformer3DModel`` (2 dual-stream + 2 single-stream blocks, 6 heads x 16)
  run by the stock ``HunyuanVideoPipeline`` with ``FlowMatchEulerDiscreteScheduler(shift=3)``, trained with the
  flow-matching objective on the same data; true classifier-free guidance against the empty prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch

from ..pipelines.tiny import TinyPipelineSpec
from .autoencoder import PixelShuffleAutoencoder

WEIGHTS_DIR = Path(__file__).parent / "weights"
REFERENCE_MODELS = ("ref-cogvideox", "ref-hunyuan")
DEFAULT_REFERENCE_MODEL = "ref-cogvideox"
DEFAULT_PROMPT = "red square moves right over checker"

#: Architecture and data geometry per reference model (the training script and the loader share these).
ARCH: dict[str, dict[str, Any]] = {
    "ref-cogvideox": dict(
        family="cogvideox", frames=9, size=32, text_len=8, text_dim=32,
        transformer=dict(
            num_attention_heads=6, attention_head_dim=16, in_channels=12, out_channels=12, time_embed_dim=96,
            text_embed_dim=32, num_layers=4, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
            patch_size_t=None, temporal_compression_ratio=1, max_text_seq_length=8,
            use_rotary_positional_embeddings=True,
        ),
        scheduler=dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
            snr_shift_scale=1.0, timestep_spacing="trailing",
        ),
        vae=dict(block_out_channels=(1, 1), temporal_compression_ratio=1, scaling_factor=3.0, shift_factor=-0.25),
        defaults=dict(height=32, width=32, num_frames=9, num_inference_steps=16, guidance_scale=4.0),
    ),
    "ref-hunyuan": dict(
        family="hunyuan_video", frames=9, size=32, text_len=8, text_dim=32, pooled_dim=32,
        transformer=dict(
            in_channels=12, out_channels=12, num_attention_heads=6, attention_head_dim=16, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=32,
            rope_theta=256.0, rope_axes_dim=(4, 6, 6),
        ),
        scheduler=dict(shift=3.0),
        vae=dict(block_out_channels=(1, 1), temporal_compression_ratio=1, scaling_factor=3.0, shift_factor=-0.25),
        defaults=dict(height=32, width=32, num_frames=9, num_inference_steps=16, true_cfg_scale=4.0),
    ),
}


def _check_name(name: str) -> dict[str, Any]:
    if name not in ARCH:
        raise ValueError(f"unknown reference model {name!r}; available: {', '.join(REFERENCE_MODELS)}")
    return ARCH[name]


def weights_path(name: str) -> Path:
    """Folder of the shipped diffusers-format weights of ``name`` (``transformer/``, ``scheduler/``, ``vae/``)."""
    _check_name(name)
    return WEIGHTS_DIR / name


class ReferencePipelineSpec(TinyPipelineSpec):
    """A reference pipeline: like :class:`TinyPipelineSpec`, but HunyuanVideo always gets the empty-prompt negative
    (the model was trained with caption dropout to it), so ``true_cfg_scale`` classifier-free guidance applies."""

    def prompt_kwargs(self, prompt: str, negative_prompt: str | None = None) -> dict[str, Any]:
        if self.family == "hunyuan_video" and negative_prompt is None:
            negative_prompt = ""
        return super().prompt_kwargs(prompt, negative_prompt)


def build_reference_pipeline(name: str = DEFAULT_REFERENCE_MODEL, *, pretrained: bool = True,
                             path: str | Path | None = None, seed: int = 0) -> ReferencePipelineSpec:
    """The stock pipeline of ``name`` with trained weights (``pretrained=True``, from ``path`` or the shipped
    folder) or freshly initialised ones (``pretrained=False``, for training)."""
    arch = _check_name(name)
    if arch["family"] == "cogvideox":
        model_cls, sched_cls, pipe_cls = (diffusers.CogVideoXTransformer3DModel, diffusers.CogVideoXDDIMScheduler,
                                          diffusers.CogVideoXPipeline)
    else:
        model_cls, sched_cls, pipe_cls = (diffusers.HunyuanVideoTransformer3DModel,
                                          diffusers.FlowMatchEulerDiscreteScheduler, diffusers.HunyuanVideoPipeline)
    folder = Path(path) if path is not None else weights_path(name)
    if pretrained:
        if not (folder / "transformer" / "config.json").is_file():
            raise FileNotFoundError(
                f"no trained weights for {name!r} at {folder}; train them with "
                f"`python -m diffusers_attn.reference_models.train --model {name}`"
            )
        transformer = model_cls.from_pretrained(folder / "transformer")
    else:
        torch.manual_seed(seed)
        transformer = model_cls(**arch["transformer"])
    transformer.eval()
    vae = PixelShuffleAutoencoder(**arch["vae"])
    scheduler = sched_cls(**arch["scheduler"])
    if arch["family"] == "cogvideox":
        pipe = pipe_cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    else:
        pipe = pipe_cls(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=scheduler,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return ReferencePipelineSpec(pipe, arch["family"], arch["text_len"], arch["text_dim"], arch.get("pooled_dim", 0),
                                 defaults=dict(arch["defaults"]))


def load_reference_pipeline(name: str = DEFAULT_REFERENCE_MODEL, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> ReferencePipelineSpec:
    """The trained reference pipeline ``name`` on ``device``/``dtype``, ready to call with
    ``spec.pipe(**spec.prompt_kwargs(prompt), **spec.defaults, generator=...)``."""
    spec = build_reference_pipeline(name)
    spec.pipe.to(device)
    if dtype != torch.float32:
        spec.pipe.to(dtype=dtype)
    return spec
