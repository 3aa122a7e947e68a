"""Paired fidelity metrics between a dense and an accelerated output (same seed).

Conventions (state them with every number):

* Inputs are float arrays/tensors in [0, 1] (``data_range=1``), videos shaped (F, H, W, C) or (F, C, H, W)
  (channels detected from the size-3/1 axis), images (H, W, C) or (C, H, W). Compute on lossless frames, never on
  re-decoded mp4.
* **PSNR**: ``global`` = one MSE over all frames, pixels and channels (default); ``per_frame`` = mean of the
  per-frame PSNRs (higher when error varies over frames). Identical inputs give ``inf``.
* **SSIM** (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, valid-region mean
  (no padding), computed per RGB channel and averaged (``color="rgb"``, default) or on BT.601 luma
  ``Y = 0.299 R + 0.587 G + 0.114 B`` (``color="luma"``), then averaged over frames.
* **LPIPS** (AlexNet, v0.1 heads, local weights only): :func:`diffusers_attn.eval.lpips.lpips`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["finite_mean", "psnr", "psnr_frames", "ssim", "to_video_tensor"]


def to_video_tensor(x: Any) -> torch.Tensor:
    """(F, C, H, W) float64 tensor from an image or video (numpy, torch or list of PIL images)."""
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in x])
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().double().cpu()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"expected an image (3-D) or video (4-D), got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    elif t.shape[1] not in (1, 3):
        raise ValueError(f"cannot find a channel axis of size 1 or 3 in shape {tuple(t.shape)}")
    return t


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = to_video_tensor(a), to_video_tensor(b)
    if ta.shape != tb.shape:
        raise ValueError(f"shape mismatch: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return ta, tb


def psnr_frames(a: Any, b: Any, *, data_range: float = 1.0) -> list[float]:
    """PSNR in dB of each frame (image) of a pair; ``inf`` for identical frames."""
    ta, tb = _pair(a, b)
    mse = ((ta - tb) ** 2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(data_range**2 / float(m)) for m in mse]


def finite_mean(values: list[float]) -> tuple[float | None, int]:
    """(mean over the finite values or ``None`` when there are none, number of infinite values): a per-frame PSNR
    mean that one identical frame does not turn into ``inf``."""
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else None), len(values) - len(finite)


def psnr(a: Any, b: Any, *, data_range: float = 1.0, mode: str = "global") -> float:
    """PSNR in dB between two images/videos; ``mode`` is ``"global"`` or ``"per_frame"`` (see module doc)."""
    ta, tb = _pair(a, b)
    if mode == "global":
        mse = float(((ta - tb) ** 2).mean())
        return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
    if mode == "per_frame":
        return float(np.mean(psnr_frames(ta, tb, data_range=data_range)))
    raise ValueError(f"mode must be 'global' or 'per_frame', got {mode!r}")


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def to_luma(t: torch.Tensor) -> torch.Tensor:
    """(F, 1, H, W) BT.601 luma of (F, 3, H, W) RGB frames."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
    return (t * w).sum(1, keepdim=True)


def ssim(a: Any, b: Any, *, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         color: str = "rgb") -> float:
    """Mean SSIM (Gaussian window; per RGB channel and averaged, or on luma), averaged over frames."""
    ta, tb = _pair(a, b)
    if color == "luma":
        if ta.shape[1] != 3:
            raise ValueError(f"color='luma' needs RGB frames, got {ta.shape[1]} channel(s)")
        ta, tb = to_luma(ta), to_luma(tb)
    elif color != "rgb":
        raise ValueError(f"color must be 'rgb' or 'luma', got {color!r}")
    Fr, C, H, W = ta.shape
    if H < win_size or W < win_size:
        raise ValueError(f"SSIM needs frames of at least {win_size}x{win_size}, got {H}x{W}")
    g = _gaussian_window(win_size, sigma)
    x = ta.reshape(Fr * C, 1, H, W)
    y = tb.reshape(Fr * C, 1, H, W)

    def filt(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z, g.view(1, 1, 1, -1))
        return F.conv2d(z, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
