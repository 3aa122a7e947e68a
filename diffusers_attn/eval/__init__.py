"""Evaluation: paired fidelity metrics (dense vs accelerated, same seed), prompt suites, sampling, VBench."""

from .lpips import AlexLPIPS, LPIPSUnavailable, lpips
from .metrics import psnr, ssim, to_video_tensor

__all__ = ["AlexLPIPS", "LPIPSUnavailable", "lpips", "psnr", "ssim", "to_video_tensor"]
