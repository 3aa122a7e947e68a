"""Golden tests of the fidelity metrics against torchmetrics / scikit-image at matching settings, hand-computed
fixtures, and LPIPS from local weight files (random weights here: plumbing and formula, not perceptual quality)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_attn.eval import AlexLPIPS, LPIPSUnavailable, lpips, psnr, ssim
from diffusers_attn.eval.lpips import find_weights
from diffusers_attn.eval.metrics import to_luma


def _pair(seed=0, shape=(3, 24, 28, 3), noise=0.05):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    return a, np.clip(a + noise * rng.standard_normal(shape), 0, 1)


def test_psnr_matches_torchmetrics_both_variants():
    tm = pytest.importorskip("torchmetrics.functional.image")
    a, b = _pair()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    # torchmetrics accumulates in float32: agreement to ~1e-7 relative
    assert psnr(a, b) == pytest.approx(float(tm.peak_signal_noise_ratio(ta, tb, data_range=1.0)), rel=1e-6)
    per = np.mean([float(tm.peak_signal_noise_ratio(ta[i], tb[i], data_range=1.0)) for i in range(3)])
    assert psnr(a, b, mode="per_frame") == pytest.approx(per, rel=1e-6)
    # per-frame mean is >= global when the error differs between frames (Jensen), and they differ here
    b2 = b.copy()
    b2[0] = a[0] + 0.2
    assert psnr(a, b2, mode="per_frame") > psnr(a, b2) + 1


def test_ssim_matches_torchmetrics_gaussian():
    tm = pytest.importorskip("torchmetrics.functional.image")
    a, b = _pair(1)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2)
    tb = torch.from_numpy(b).permute(0, 3, 1, 2)
    # torchmetrics averages its SSIM map over the whole reflect-padded image; ours (and scikit-image's) is the mean
    # over the valid region. Matching settings: take torchmetrics' full map and crop the 5-pixel border.
    _, full = tm.structural_similarity_index_measure(tb, ta, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                     data_range=1.0, k1=0.01, k2=0.03, return_full_image=True)
    ref = float(full[..., 5:-5, 5:-5].mean())
    assert ssim(a, b) == pytest.approx(ref, rel=1e-9)


def test_ssim_luma_matches_scikit_image_grayscale():
    skm = pytest.importorskip("skimage.metrics")
    a, b = _pair(2)
    ya = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    yb = 0.299 * b[..., 0] + 0.587 * b[..., 1] + 0.114 * b[..., 2]
    ref = np.mean([skm.structural_similarity(ya[i], yb[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False) for i in range(3)])
    assert ssim(a, b, color="luma") == pytest.approx(ref, rel=1e-9)
    assert ssim(a, b, color="luma") != pytest.approx(ssim(a, b), rel=1e-6)
    with pytest.raises(ValueError, match="'rgb' or 'luma'"):
        ssim(a, b, color="lab")


def test_ssim_hand_computed_constant_images():
    """Constant frames x = 0.2 and y = 0.6: variances vanish, SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)."""
    a = np.full((1, 16, 16, 3), 0.2)
    b = np.full((1, 16, 16, 3), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-12)
    # luma of a grey image is the grey level
    assert float(to_luma(torch.full((1, 3, 2, 2), 0.4, dtype=torch.float64)).max()) == pytest.approx(0.4)


def test_psnr_hand_computed_per_frame():
    a = np.zeros((2, 4, 4, 3))
    b = np.zeros((2, 4, 4, 3))
    b[0] = 0.1  # frame 0: MSE 0.01 -> 20 dB; frame 1: MSE 0.0001 -> 40 dB
    b[1] = 0.01
    assert psnr(a, b, mode="per_frame") == pytest.approx(30.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / ((0.01 + 0.0001) / 2)))


# --- LPIPS -----------------------------------------------------------------------------------------------------
def _fake_weights(tmp_path, seed=0):
    """Random AlexNet backbone in torchvision's key names and random v0.1 heads in lpips' key names."""
    g = torch.Generator().manual_seed(seed)
    net = AlexLPIPS()
    backbone = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in net.features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # extra torchvision keys are ignored
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate((64, 192, 384, 256, 256))}
    bp, hp = tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth"
    torch.save(backbone, bp)
    torch.save(heads, hp)
    return bp, hp, backbone, heads


def _reference_lpips(x, y, backbone, heads):
    """Independent formula: explicit convolutions and pools, lpips' normalisation, per-layer spatial mean."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = [(0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1)]

    def feats(z):
        z = (z * 2 - 1 - shift) / scale
        out = []
        for i, (idx, stride, pad) in enumerate(convs):
            if i in (1, 2):
                z = F.max_pool2d(z, 3, 2)
            z = F.relu(F.conv2d(z, backbone[f"features.{idx}.weight"], backbone[f"features.{idx}.bias"], stride, pad))
            out.append(z)
        return out

    total = 0.0
    for i, (fa, fb) in enumerate(zip(feats(x), feats(y))):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((na - nb) ** 2 * heads[f"lin{i}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_from_local_files_matches_reference_formula(tmp_path):
    bp, hp, backbone, heads = _fake_weights(tmp_path)
    rng = np.random.default_rng(3)
    a = rng.random((2, 64, 64, 3)).astype(np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    got = lpips(a, b, backbone=str(bp), heads=str(hp))
    x = torch.from_numpy(a).permute(0, 3, 1, 2)
    y = torch.from_numpy(b).permute(0, 3, 1, 2)
    ref = float(_reference_lpips(x, y, backbone, heads).mean())
    assert got == pytest.approx(ref, rel=1e-5) and got > 0
    assert lpips(a, a, backbone=str(bp), heads=str(hp)) == pytest.approx(0.0, abs=1e-9)
    assert lpips(b, a, backbone=str(bp), heads=str(hp)) == pytest.approx(got, rel=1e-5)  # symmetric


def test_lpips_matches_torchmetrics_with_same_weights(tmp_path, monkeypatch):
    pytest.importorskip("torchvision", reason="torchmetrics' LPIPS needs torchvision (not installed)")
    tm = pytest.importorskip("torchmetrics.functional.image")
    bp, hp, _, _ = _fake_weights(tmp_path / "hub" / "checkpoints")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    a, b = _pair(4, (2, 64, 64, 3), 0.1)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float()
    ref = float(tm.learned_perceptual_image_patch_similarity(ta, tb, net_type="alex", normalize=True))
    assert lpips(a, b, backbone=str(bp)) == pytest.approx(ref, rel=1e-4)


def test_lpips_missing_weights_is_a_clear_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("DIFFATTN_LPIPS_BACKBONE", raising=False)
    monkeypatch.delenv("DIFFUSERS_ATTN_LPIPS_BACKBONE", raising=False)  # the deprecated name is still read
    with pytest.raises(LPIPSUnavailable, match="LPIPS skipped, weights not present locally: AlexNet backbone "
                                               "alexnet-owt-7be5be79.pth"):
        find_weights()
