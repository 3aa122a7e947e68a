"""``OpenSoraPipeline``: Open-Sora 2.0 text-to-video and image-to-video in diffusers form.

Components: T5 v1.1-XXL (``tokenizer``/``text_encoder``; padded to 512 tokens, encoded without a mask), CLIP-L
pooled text (``tokenizer_2``/``text_encoder_2``), the HunyuanVideo VAE (``AutoencoderKLHunyuanVideo``),
:class:`OpenSoraTransformer3DModel` and ``FlowMatchEulerDiscreteScheduler`` with the reference's
resolution/frame-dependent linear shift. Guidance follows the reference sampler (:mod:`.sampling`): text CFG for
t2v; for image conditioning three branches ``[prompt + cond, negative + cond, negative + no cond]``,
``v = v3 + g_img (v2 - v3) + g_txt (v1 - v2)``, oscillation (from step 10, odd steps use scale 1) and temporal
image guidance. Text encoders are optional when embeddings are passed (offline use).

The VAE runs as in the release config (``configs/diffusion/inference/256px.py``): spatial tiling on (256-pixel
tiles, a quarter overlap), temporal tiling off, for decoding and for encoding the i2v reference. Trade memory with
:meth:`OpenSoraPipeline.set_vae_tiling`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .convert import convert_hunyuan_vae, scheduler_for_opensora, transformer_from_original
from .sampling import (
    CONDITION_TYPES,
    OSCILLATION_START,
    RESOLUTIONS,
    add_prompt_suffix,
    guided_velocity,
    oscillated_scale,
    reference_sigmas,
    resize_crop_to_fill,
    resolution_to_size,
    shift_alpha,
)
from .transformer import OpenSoraTransformer3DModel
from .vae_io import conditioning_pixels, configure_vae_tiling

logger = logging.get_logger(__name__)

@dataclass
class OpenSoraPipelineOutput(BaseOutput):
    """``frames``: list of PIL frame lists, an np array [B, F, H, W, 3], a tensor [B, F, 3, H, W], or latents."""

    frames: Any


class OpenSoraPipeline(DiffusionPipeline):
    """Open-Sora 2.0 (hpcaitech) text/image-to-video. See :meth:`__call__`."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]

    def __init__(
        self,
        transformer: OpenSoraTransformer3DModel,
        scheduler: Any,
        vae: Any = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        cfg = getattr(vae, "config", None)
        self.vae_scale_factor_spatial = getattr(cfg, "spatial_compression_ratio", 8) if cfg is not None else 8
        self.vae_scale_factor_temporal = getattr(cfg, "temporal_compression_ratio", 4) if cfg is not None else 4
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.tokenizer_max_length = 512
        if vae is not None and hasattr(vae, "enable_tiling") and hasattr(vae, "use_framewise_decoding"):
            self.set_vae_tiling()  # the release config's VAE settings

    # ------------------------------------------------------------------ VAE memory
    def set_vae_tiling(self, spatial: bool = True, temporal: bool = False, tile_size: int = 256) -> None:
        """How the VAE splits its work; the defaults are the release config's and are set on construction.

        ``spatial``: encode/decode in ``tile_size``-pixel tiles (a quarter overlap, blended), as the reference's
        ``use_spatial_tiling``; a frame no larger than one tile is processed whole. ``spatial=False`` decodes the
        whole frame at once (more memory, no blending, so it differs slightly from the release output).
        ``temporal``: diffusers' framewise decoding and encoding (chunks of 16 frames, stride 12; not the
        reference's temporal tiling): the least memory, output differs from the release config. ``tile_size``
        must be a multiple of 4x the VAE's spatial compression (32 pixels) so tiles fall on the reference's grid.
        """
        configure_vae_tiling(self.vae, self.vae_scale_factor_spatial, spatial, temporal, tile_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_original_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        *,
        vae: Any = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        scheduler: Any = None,
        torch_dtype: torch.dtype | None = None,
        config_overrides: dict[str, Any] | None = None,
    ) -> "OpenSoraPipeline":
        """Build the pipeline from ``Open_Sora_v2.safetensors`` (converted in memory, no copy on disk).

        ``vae`` may be an ``AutoencoderKLHunyuanVideo`` or the path of ``hunyuan_vae.safetensors``; text encoders
        are transformers models (or omit them and pass embeddings to the call)."""
        transformer = transformer_from_original(checkpoint, torch_dtype=torch_dtype, config_overrides=config_overrides)
        if isinstance(vae, (str, os.PathLike)):
            vae = convert_hunyuan_vae(vae, torch_dtype=torch_dtype)
        return cls(
            transformer=transformer, scheduler=scheduler or scheduler_for_opensora(), vae=vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )

    # ------------------------------------------------------------------ text
    def _t5(self, prompts: list[str], device, dtype) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        # The reference encodes without an attention mask and passes all 512 states unmasked.
        return self.text_encoder(ids.to(device), output_hidden_states=False)[0].to(dtype=dtype)

    def _clip(self, prompts: list[str], device, dtype) -> torch.Tensor:
        ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=77, truncation=True,  # CLIP-L context
            return_tensors="pt",
        ).input_ids
        return self.text_encoder_2(ids.to(device), output_hidden_states=False).pooler_output.to(dtype=dtype)

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 hidden states [B, 512, 4096], CLIP pooled [B, 768]); given embeddings are used as they are."""
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
        if prompt_embeds is None:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("OpenSoraPipeline has no T5 text_encoder/tokenizer: pass prompt_embeds "
                                 "(and negative_prompt_embeds for guidance)")
            prompt_embeds = self._t5(prompts, device, dtype)
        if pooled_prompt_embeds is None:
            if self.text_encoder_2 is None or self.tokenizer_2 is None:
                raise ValueError("OpenSoraPipeline has no CLIP text_encoder_2/tokenizer_2: pass pooled_prompt_embeds "
                                 "(and negative_pooled_prompt_embeds for guidance)")
            pooled_prompt_embeds = self._clip(prompts, device, dtype)
        if prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
            raise ValueError(
                f"prompt_embeds batch {prompt_embeds.shape[0]} != pooled_prompt_embeds batch {pooled_prompt_embeds.shape[0]}"
            )
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_videos_per_prompt, 0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
            num_videos_per_prompt, 0)
        return prompt_embeds, pooled_prompt_embeds

    # ------------------------------------------------------------------ properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ checks
    def check_inputs(self, prompt, prompt_embeds, pooled_prompt_embeds, height, width, num_frames, condition_type,
                     image, output_type, callback_on_step_end_tensor_inputs, num_inference_steps=1) -> None:
        if prompt is None and prompt_embeds is None:
            raise ValueError("provide `prompt` or `prompt_embeds`")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("provide `prompt` or `prompt_embeds`, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` (the CLIP pooled embedding of the same prompt)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(
                f"num_frames must be {self.vae_scale_factor_temporal}k+1 (e.g. 33, 65, 129), got {num_frames}"
            )
        if num_frames > 129:
            logger.warning("Open-Sora 2.0 was trained on at most 129 frames; got %d", num_frames)
        if condition_type not in CONDITION_TYPES:
            raise ValueError(f"condition_type must be one of {CONDITION_TYPES}, got {condition_type!r}")
        if condition_type != "t2v" and image is None:
            raise ValueError(f"condition_type={condition_type!r} needs an `image`")
        if condition_type != "t2v" and self.vae is None:
            raise ValueError("image conditioning needs a `vae`")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError("decoding needs a `vae`: pass one or use output_type='latent'")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")

    # ------------------------------------------------------------------ conditioning
    @staticmethod
    def preprocess_image(image: Any, height: int, width: int) -> torch.Tensor:
        """Conditioning image(s) -> [B, 3, height, width] in [-1, 1], as the reference's ``resize_crop`` transform.

        The reference reads 8-bit RGB files: PIL images go through that exact path (bicubic scale to cover, centre
        crop); numpy arrays [H, W, 3] / [B, H, W, 3] and tensors [3, H, W] / [B, 3, H, W] in [0, 1] are first
        rounded to 8-bit PIL images, as saving them to a file would."""
        return conditioning_pixels(image, height, width)

    def _encode_image(self, image, height, width, generator, device, sample_posterior: bool) -> torch.Tensor:
        pixels = self.preprocess_image(image, height, width)
        pixels = pixels.to(device=device, dtype=self.vae.dtype).unsqueeze(2)  # [B, 3, 1, H, W] in [-1, 1]
        dist = self.vae.encode(pixels).latent_dist
        lat = dist.sample(generator) if sample_posterior else dist.mode()
        return lat * self.vae.config.scaling_factor

    def prepare_condition(self, condition_type, image, last_image, batch, latent_shape, height, width, generator,
                          device, dtype, sample_posterior=True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(condition [B, C+1, T, h, w] = [mask | reference latent], reference latent, conditioned frame indices)."""
        _, c, t, h, w = latent_shape
        ref = torch.zeros(batch, c, t, h, w, device=device, dtype=torch.float32)
        mask = torch.zeros(batch, 1, t, h, w, device=device, dtype=torch.float32)
        frames: list[int] = []
        if condition_type in ("i2v_head", "i2v_loop"):
            frames.append(0)
        if condition_type in ("i2v_tail", "i2v_loop"):
            frames.append(t - 1)
        sources = {0: image, t - 1: (last_image if (condition_type == "i2v_loop" and last_image is not None) else image)}
        for f in frames:
            lat = self._encode_image(sources[f], height, width, generator, device, sample_posterior).float()
            if lat.shape[0] == 1 and batch > 1:
                lat = lat.expand(batch, -1, -1, -1, -1)
            if lat.shape[0] != batch:
                raise ValueError(f"got {lat.shape[0]} conditioning images for a batch of {batch}")
            ref[:, :, f] = lat[:, :, 0]
            mask[:, :, f] = 1.0
        return torch.cat([mask, ref], dim=1).to(dtype), ref, frames

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        image: Any = None,
        last_image: Any = None,
        condition_type: str | None = None,
        height: int | None = None,
        width: int | None = None,
        resolution: str = "256px",
        aspect_ratio: str = "16:9",
        num_frames: int = 129,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 3.0,
        text_guidance_oscillation: bool = True,
        image_guidance_oscillation: bool = True,
        temporal_image_guidance: bool = True,
        motion_score: int | str = 4,
        fps: int = 24,
        add_prompt_suffix: bool = True,
        num_videos_per_prompt: int = 1,
        sample_posterior: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> OpenSoraPipelineOutput | tuple:
        """Generate a video.

        Args:
            prompt: Text prompt(s); with ``add_prompt_suffix`` it gets ``" {fps} FPS. {motion_score} motion score."``
                as in the reference (the FPS part only if the prompt does not already end in ``"<n> FPS."``). Or
                pass ``prompt_embeds`` (T5 [B, L, 4096]) + ``pooled_prompt_embeds`` (CLIP [B, 768]).
            negative_prompt: Negative prompt (no suffix), default ``""``; or ``negative_*`` embeddings.
            image: Conditioning image for ``condition_type`` ``i2v_head`` (default when an image is given),
                ``i2v_tail`` or ``i2v_loop`` (``last_image`` is the loop's last frame, default ``image``).
            image: PIL image(s), or arrays/tensors in [0, 1]; resized as the reference does (:meth:`preprocess_image`).
            height, width: Output size, rounded up to multiples of 16; default from ``resolution`` (``256px`` or
                ``768px``) and ``aspect_ratio`` ('W:H', one of the reference's buckets, e.g. ``16:9``, ``9:16``,
                ``1:1``, ``4:3``, ``3:4``, ``2.39:1``), with the reference's sizes.
            num_frames: 4k+1 frames, at most 129 (trained range).
            guidance_scale, image_guidance_scale: Text and image guidance (7.5 and 3.0).
            text_guidance_oscillation, image_guidance_oscillation: From step 10 on, odd steps use scale 1.
            temporal_image_guidance: Per latent frame image scale ``linspace(1, c_i, T)``, ``c_i`` decaying to 1.
            output_type: ``pil`` | ``np`` | ``pt`` | ``latent``.
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs) -> dict`` updating tensors named in
                ``callback_on_step_end_tensor_inputs``.
        """
        if condition_type is None:
            condition_type = "i2v_head" if image is not None else "t2v"
        if height is None or width is None:
            h_def, w_def = resolution_to_size(resolution, aspect_ratio)
            height, width = height or h_def, width or w_def
        height, width = int(math.ceil(height / 16) * 16), int(math.ceil(width / 16) * 16)
        self.check_inputs(prompt, prompt_embeds, pooled_prompt_embeds, height, width, num_frames, condition_type,
                          image, output_type, callback_on_step_end_tensor_inputs, num_inference_steps)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device
        dtype = self.transformer.dtype

        # 1. text
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if add_prompt_suffix:
                prompts = [add_prompt_suffix_fn(p, fps, motion_score) for p in prompts]
        else:
            prompts = None
        prompt_embeds, pooled_prompt_embeds = self.encode_prompt(
            prompts, device, num_videos_per_prompt, prompt_embeds, pooled_prompt_embeds, dtype)
        batch = prompt_embeds.shape[0]
        i2v = condition_type != "t2v"
        need_negative = i2v or guidance_scale != 1.0
        if need_negative:
            if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                n_prompts = batch // num_videos_per_prompt
                neg = negative_prompt if negative_prompt is not None else ""
                neg = [neg] * n_prompts if isinstance(neg, str) else list(neg)
                if len(neg) != n_prompts:
                    raise ValueError(f"negative_prompt has {len(neg)} entries for {n_prompts} prompts")
            else:
                neg = None
            negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
                neg, device, num_videos_per_prompt, negative_prompt_embeds,
                negative_pooled_prompt_embeds, dtype)
            if negative_prompt_embeds.shape[0] != batch:
                raise ValueError(f"negative embeddings batch {negative_prompt_embeds.shape[0]} != prompt batch {batch}")

        # 2. latents
        c = self.transformer.config.in_channels
        t_lat = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        h_lat, w_lat = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        shape = (batch, c, t_lat, h_lat, w_lat)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=torch.float32)

        # 3. condition
        cond = ref = None
        cond_frames: list[int] = []
        if i2v:
            cond, ref, cond_frames = self.prepare_condition(
                condition_type, image, last_image, batch, shape, height, width, generator, device, dtype,
                sample_posterior)

        # 4. schedule: linspace(1, 0, N+1)[:-1] with the linear shift alpha (scheduler appends the final 0)
        p = self.transformer.config.patch_size
        alpha = shift_alpha((h_lat // p) * (w_lat // p), t_lat)
        sc = self.scheduler.config
        if not sc.get("use_dynamic_shifting", False) or sc.get("time_shift_type", "exponential") != "linear":
            logger.warning(
                "OpenSoraPipeline: the scheduler is not FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, "
                "time_shift_type='linear'), so the reference shift alpha=%.3f is not applied as in Open-Sora", alpha
            )
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], mu=alpha,
                                     device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 5. branches
        if i2v:
            txt = torch.cat([prompt_embeds, negative_prompt_embeds, negative_prompt_embeds])
            pooled = torch.cat([pooled_prompt_embeds, negative_pooled_prompt_embeds, negative_pooled_prompt_embeds])
            cond_in = torch.cat([cond, cond, torch.zeros_like(cond)])
            n_branch = 3
        elif guidance_scale != 1.0:
            txt = torch.cat([prompt_embeds, negative_prompt_embeds])
            pooled = torch.cat([pooled_prompt_embeds, negative_pooled_prompt_embeds])
            cond_in, n_branch = None, 2
        else:
            txt, pooled, cond_in, n_branch = prompt_embeds, pooled_prompt_embeds, None, 1

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                sigma = self.scheduler.sigmas[i].to(device=device, dtype=torch.float32)
                x_in = torch.cat([latents] * n_branch).to(dtype)
                v = self.transformer(
                    hidden_states=x_in, encoder_hidden_states=txt, pooled_projections=pooled,
                    timestep=sigma.expand(x_in.shape[0]), condition=cond_in, attention_kwargs=attention_kwargs,
                    return_dict=False,
                )[0].float()
                v = guided_velocity(
                    v, n_branch, i, num_inference_steps, guidance_scale=guidance_scale,
                    image_guidance_scale=image_guidance_scale, text_guidance_oscillation=text_guidance_oscillation,
                    image_guidance_oscillation=image_guidance_oscillation,
                    temporal_image_guidance=temporal_image_guidance,
                )
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    env = {"latents": latents, "prompt_embeds": prompt_embeds,
                           "pooled_prompt_embeds": pooled_prompt_embeds}
                    kw = {k: env[k] for k in callback_on_step_end_tensor_inputs}
                    out = callback_on_step_end(self, i, t, kw) or {}
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    pooled_prompt_embeds = out.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                    if n_branch > 1:
                        txt = torch.cat([prompt_embeds, *txt[batch:].split(batch)])
                        pooled = torch.cat([pooled_prompt_embeds, *pooled[batch:].split(batch)])
                    else:
                        txt, pooled = prompt_embeds, pooled_prompt_embeds
                progress_bar.update()
        self._current_timestep = None

        # 6. conditioned frames are replaced by the reference latent, then decode
        for f in cond_frames:
            latents[:, :, f] = ref[:, :, f]
        if output_type == "latent":
            video = latents
        else:
            lat = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            video = self.vae.decode(lat, return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return OpenSoraPipelineOutput(frames=video)


add_prompt_suffix_fn = add_prompt_suffix  # the call argument of the same name shadows the function

__all__ = [
    "CONDITION_TYPES", "OSCILLATION_START", "RESOLUTIONS", "OpenSoraPipeline", "OpenSoraPipelineOutput",
    "add_prompt_suffix", "oscillated_scale", "reference_sigmas", "resize_crop_to_fill", "resolution_to_size",
    "shift_alpha",
]
