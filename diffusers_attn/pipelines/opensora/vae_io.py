"""Open-Sora 2.0 VAE-side helpers of the pipeline: conditioning-image preprocessing and the VAE tiling setup."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .sampling import resize_crop_to_fill


def conditioning_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    """See :meth:`OpenSoraPipeline.preprocess_image`."""
    items = image if isinstance(image, (list, tuple)) else [image]
    pils: list[PIL.Image.Image] = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            pils.append(item)
            continue
        if isinstance(item, torch.Tensor):
            if item.ndim not in (3, 4) or item.shape[-3] != 3:
                raise ValueError(f"image tensors must be [3, H, W] or [B, 3, H, W], got {tuple(item.shape)}")
            item = VaeImageProcessor.pt_to_numpy(item.detach().float().cpu().reshape(-1, *item.shape[-3:]))
        elif isinstance(item, np.ndarray):
            if item.ndim not in (3, 4) or item.shape[-1] != 3:
                raise ValueError(f"image arrays must be [H, W, 3] or [B, H, W, 3], got {item.shape}")
            item = item.reshape(-1, *item.shape[-3:]).astype(np.float32)
        else:
            raise ValueError(f"image must be a PIL image, a numpy array or a tensor, got {type(item).__name__}")
        if item.min() < 0 or item.max() > 1:
            raise ValueError("image arrays/tensors must hold values in [0, 1]")
        pils.extend(VaeImageProcessor.numpy_to_pil(item))
    arrays = [np.asarray(resize_crop_to_fill(p, height, width), dtype=np.float32) / 255.0 for p in pils]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (pixels - 0.5) / 0.5


def configure_vae_tiling(vae: Any, scale_factor_spatial: int, spatial: bool, temporal: bool, tile_size: int) -> None:
    """See :meth:`OpenSoraPipeline.set_vae_tiling`."""
    if vae is None or not (hasattr(vae, "enable_tiling") and hasattr(vae, "use_framewise_decoding")):
        raise ValueError("set_vae_tiling needs an AutoencoderKLHunyuanVideo `vae`")
    step = 4 * scale_factor_spatial
    if tile_size <= 0 or tile_size % step:
        raise ValueError(f"tile_size must be a positive multiple of {step} pixels, got {tile_size}")
    if spatial:
        # diffusers' stride s and blend (tile - s) equal the reference's int(tile * 0.75) and int(tile * 0.25)
        # in pixels and in latents when the tile is a multiple of 4x the compression.
        stride = tile_size * 3 // 4
        vae.enable_tiling(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
                          tile_sample_stride_height=stride, tile_sample_stride_width=stride)
    else:
        vae.use_tiling = False
    vae.use_framewise_decoding = temporal
    vae.use_framewise_encoding = temporal
