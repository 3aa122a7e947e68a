"""The Open-Sora 2.0 reference sampler's arithmetic, free of the pipeline: output size buckets, the prompt suffix,
the resolution/frame-dependent shifted schedule and the guidance combination with oscillation and temporal image
guidance. Written after ``opensora/utils/sampling.py`` of https://github.com/hpcaitech/Open-Sora (Open-Sora 2.0,
arXiv:2503.09642).
"""

from __future__ import annotations

import math

import numpy as np
import torch

CONDITION_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop")
RESOLUTIONS = {"256px": 256, "768px": 768}
OSCILLATION_START = 10  # reference: get_oscillation_gs(..., force_num=10)



def shift_alpha(tokens_per_frame: int, latent_frames: int) -> float:
    """Reference time-shift alpha = (m S + b) sqrt(T_lat), the line through (256, 1) and (4096, 3)."""
    m = 2.0 / 3840.0
    b = 1.0 - 256.0 * m
    return (m * tokens_per_frame + b) * math.sqrt(latent_frames)


def reference_sigmas(num_steps: int, alpha: float) -> np.ndarray:
    """The reference schedule: linspace(1, 0, N + 1) shifted by alpha s / (1 + (alpha - 1) s)."""
    s = np.linspace(1.0, 0.0, num_steps + 1)
    return alpha * s / (1.0 + (alpha - 1.0) * s)


def oscillated_scale(scale: float, step: int, enabled: bool) -> float:
    if enabled and step >= OSCILLATION_START and step % 2 == 1:
        return 1.0
    return scale


def resolution_to_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of the reference's ``256px``/``768px`` buckets for ``aspect_ratio`` 'W:H'."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {tuple(RESOLUTIONS)}, got {resolution!r}")
    try:
        w_r, h_r = (float(x) for x in str(aspect_ratio).split(":"))
        ratio = w_r / h_r
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect_ratio must look like '16:9', got {aspect_ratio!r}") from None
    pixels = RESOLUTIONS[resolution] ** 2
    width = int(math.sqrt(pixels * ratio) // 16) * 16
    height = int((pixels / width) // 16) * 16
    return height, width


def add_prompt_suffix(prompt: str, fps: int, motion_score: int | str) -> str:
    """``"raining, sea"`` -> ``"raining, sea. 24 FPS. 4 motion score."`` as the reference script does."""
    p = prompt.strip()
    if not p.endswith("."):
        p += "."
    return f"{p} {fps} FPS. {motion_score} motion score."


def guided_velocity(
    v: torch.Tensor,
    n_branch: int,
    step: int,
    num_steps: int,
    *,
    guidance_scale: float,
    image_guidance_scale: float,
    text_guidance_oscillation: bool,
    image_guidance_oscillation: bool,
    temporal_image_guidance: bool,
) -> torch.Tensor:
    """The guided velocity from the transformer outputs of the ``n_branch`` branches stacked on the batch axis.

    Three branches ``[prompt + cond, negative + cond, negative + no cond]`` (image conditioning):
    ``v3 + g_img (v2 - v3) + g_txt (v1 - v2)``, with ``g_img`` rising linearly over the latent frames from 1 when
    ``temporal_image_guidance``; two branches (text CFG): ``v_neg + g_txt (v_pos - v_neg)``; one: ``v`` as it is.
    """
    text_gs = oscillated_scale(guidance_scale, step, text_guidance_oscillation)
    if n_branch == 3:
        v1, v2, v3 = v.chunk(3)
        image_gs: float | torch.Tensor = oscillated_scale(image_guidance_scale, step, image_guidance_oscillation)
        if temporal_image_guidance and image_gs > 1.0:
            t_lat = v.shape[2]
            upper = torch.linspace(image_gs, 1.0, num_steps + 1)[step]
            image_gs = torch.linspace(1.0, float(upper), t_lat).to(v.device).view(1, 1, t_lat, 1, 1)
        return v3 + image_gs * (v2 - v3) + text_gs * (v1 - v2)
    if n_branch == 2:
        v_pos, v_neg = v.chunk(2)
        return v_neg + text_gs * (v_pos - v_neg)
    return v
