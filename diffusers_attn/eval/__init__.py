"""Evaluation: paired fidelity metrics (dense vs accelerated, same seed)."""

from .metrics import psnr, ssim, to_video_tensor

__all__ = ["psnr", "ssim", "to_video_tensor"]
