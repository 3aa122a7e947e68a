"""Fidelity metrics: golden values from scikit-image with matching settings, and hand-computed fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusers_attn.eval import psnr, ssim


def test_psnr_hand_computed():
    a = np.zeros((2, 4, 4, 3))
    b = np.full((2, 4, 4, 3), 0.1)  # MSE = 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    b[1] = 0.0  # frame 0: 20 dB, frame 1: identical (inf); global MSE 0.005 -> 23.01 dB
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.005))
    assert psnr(a, b, mode="per_frame") == math.inf
    assert psnr(a, a) == math.inf


def test_psnr_and_ssim_match_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((3, 32, 40, 3))
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    assert psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-12)
    per_frame = np.mean([skm.peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(3)])
    assert psnr(a, b, mode="per_frame") == pytest.approx(per_frame, rel=1e-12)
    ref = np.mean([
        skm.structural_similarity(a[i], b[i], channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False)
        for i in range(3)
    ])
    assert ssim(a, b) == pytest.approx(ref, rel=1e-9)


def test_layouts_and_errors():
    rng = np.random.default_rng(1)
    a = rng.random((2, 16, 16, 3)).astype(np.float32)
    b = np.clip(a + 0.1, 0, 1)
    chw = torch.from_numpy(a).permute(0, 3, 1, 2)
    assert psnr(chw, torch.from_numpy(b).permute(0, 3, 1, 2)) == pytest.approx(psnr(a, b))
    assert ssim(a[0], b[0]) == pytest.approx(ssim(a[:1], b[:1]))
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(a, b[:1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :8, :8], b[:, :8, :8])
    with pytest.raises(ValueError, match="mode"):
        psnr(a, b, mode="median")
