"""The Open-Sora 2.0 reference sampler's arithmetic, free of the pipeline: output size buckets, the prompt suffix,
the resolution/frame-dependent shifted schedule and the guidance combination with oscillation and temporal image
guidance. Written after ``opensora/utils/sampling.py`` of https://github.com/hpcaitech/Open-Sora (Open-Sora 2.0,
arXiv:2503.09642).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image

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


# The reference's (height, width) buckets, as ``get_image_size(resolution, ratio, training=False)`` returns them
# (``opensora/datasets/aspect.py``): for each ratio of its list, width = floor(sqrt(P r) / 16) * 16 and
# height = floor(P / width / 16) * 16, and the swapped ratio gets the swapped size, which overrides a direct
# computation (so 3:4 is 4:3 turned on its side). Listed rather than recomputed; the tests re-derive every entry.
ASPECT_RATIO_BUCKETS: dict[str, dict[str, tuple[int, int]]] = {
    "256px": {
        "2.39:1": (160, 384), "2:1": (176, 352), "16:9": (192, 336), "1.85:1": (192, 336), "9:16": (336, 192),
        "5:8": (336, 192), "3:2": (208, 304), "4:3": (224, 288), "1:1": (256, 256), "1:2.39": (384, 160),
        "1:2": (352, 176), "1:1.85": (336, 192), "8:5": (192, 336), "2:3": (304, 208), "3:4": (288, 224),
    },
    "768px": {
        "2.39:1": (496, 1184), "2:1": (544, 1072), "16:9": (576, 1024), "1.85:1": (560, 1040), "9:16": (1024, 576),
        "5:8": (992, 592), "3:2": (624, 928), "4:3": (656, 880), "1:1": (768, 768), "1:2.39": (1184, 496),
        "1:2": (1072, 544), "1:1.85": (1040, 560), "8:5": (592, 992), "2:3": (928, 624), "3:4": (880, 656),
    },
}


def resolution_to_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of the reference's ``256px``/``768px`` bucket for ``aspect_ratio`` 'W:H' (one of its 15)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {tuple(RESOLUTIONS)}, got {resolution!r}")
    buckets = ASPECT_RATIO_BUCKETS[resolution]
    if aspect_ratio not in buckets:
        raise ValueError(
            f"aspect_ratio must be one of the reference's {tuple(buckets)}, got {aspect_ratio!r}; "
            "pass height and width for other sizes"
        )
    return buckets[aspect_ratio]


_FPS_SUFFIX = re.compile(r"\d+ FPS\.$")


def add_prompt_suffix(prompt: str, fps: int, motion_score: int | str) -> str:
    """``"raining, sea"`` -> ``"raining, sea. 24 FPS. 4 motion score."`` as the reference script does.

    As in the reference (``add_fps_info_to_text``), a prompt that already ends in ``"<n> FPS."`` keeps its own
    FPS; the motion score is always appended."""
    p = prompt.strip()
    if not p.endswith("."):
        p += "."
    if not _FPS_SUFFIX.search(p):
        p += f" {fps} FPS."
    return f"{p} {motion_score} motion score."


def resize_crop_to_fill(image: Image.Image, height: int, width: int) -> Image.Image:
    """The reference's ``resize_crop`` image transform: scale (PIL bicubic) so the image covers height x width,
    then crop the centre (offset rounded), on an RGB image."""
    image = image.convert("RGB")
    w, h = image.size
    rh, rw = height / h, width / w
    if rh > rw:
        sh, sw = height, round(w * rh)
        top, left = 0, int(round((sw - width) / 2.0))
    else:
        sh, sw = round(h * rw), width
        top, left = int(round((sh - height) / 2.0)), 0
    image = image.resize((sw, sh), Image.BICUBIC)
    return image.crop((left, top, left + width, top + height))


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
