"""Paired fidelity of a sample folder (``diffusers-attn eval sample``): accelerated vs dense, per video.

Measured on the lossless frames (never the mp4): PSNR (global MSE, and per-frame mean), SSIM (Gaussian 11x11,
sigma 1.5, RGB channels averaged), LPIPS-Alex when its weights are present locally (else the column is empty and
the reason is reported), realized attention density and speedup. Writes ``fidelity.csv`` (one row per video) and
``fidelity_summary.json`` (mean ± sample standard deviation over videos, ddof=1; identical pairs have infinite
PSNR and are counted, not averaged).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .lpips import AlexLPIPS, LPIPSUnavailable, lpips
from .metrics import psnr, ssim
from .sample import MANIFEST

COLUMNS = ("name", "prompt", "index", "seed", "psnr_db", "psnr_per_frame_db", "ssim", "lpips", "density",
           "video_density", "dense_denoise_s", "accel_denoise_s", "dense_total_s", "accel_total_s", "speedup_denoise",
           "speedup_total")
DEFINITIONS = {
    "psnr_db": "PSNR, one MSE over all frames, pixels and RGB channels, data range 1 (uint8 frames / 255)",
    "psnr_per_frame_db": "mean of per-frame PSNRs",
    "ssim": "SSIM, Gaussian 11x11 sigma 1.5, K1 0.01 K2 0.03, valid region, RGB channels averaged, frame mean",
    "lpips": "LPIPS v0.1 AlexNet, inputs mapped to [-1, 1], frame mean",
    "density": "FLOP-weighted share of (query, key) pairs computed vs dense, all tokens",
    "speedup_total": "dense total time / accelerated total time (with VAE decode), per video",
    "speedup_overall": "sum of dense total times / sum of accelerated total times",
}


def _mean_std(vals: list[float]) -> dict[str, Any]:
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"n": len(finite)}
    if finite:
        out["mean"] = float(np.mean(finite))
        out["std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    n_inf = sum(1 for v in vals if v is not None and math.isinf(v))
    if n_inf:
        out["n_identical"] = n_inf
    return out


def fidelity(root: str | Path, *, use_lpips: bool = True, lpips_backbone: str | None = None,
             lpips_heads: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute the CSV and summary for a sample folder; returns the summary."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{root} has no {MANIFEST}: run `diffusers-attn eval sample` first")
    manifest = json.loads(manifest_path.read_text())
    dense_arm, accel_arm = manifest["arms"]
    lpips_net = None
    lpips_note = "disabled (--no-lpips)"
    if use_lpips:
        try:
            lpips_net = AlexLPIPS.from_files(lpips_backbone, lpips_heads)
            lpips_note = "computed"
        except LPIPSUnavailable as e:
            lpips_note = str(e)  # "LPIPS skipped, ...": printed once, in the summary below
    rows = []
    unpaired = []
    for rec_path in sorted((root / accel_arm / "records").glob("*.json")):
        name = rec_path.stem
        dense_rec_path = root / dense_arm / "records" / f"{name}.json"
        if not dense_rec_path.exists():
            unpaired.append(name)
            continue
        acc, den = json.loads(rec_path.read_text()), json.loads(dense_rec_path.read_text())
        a = np.load(root / dense_arm / "frames" / f"{name}.npz")["frames"].astype(np.float64) / 255.0
        b = np.load(root / accel_arm / "frames" / f"{name}.npz")["frames"].astype(np.float64) / 255.0
        lp = None
        if lpips_net is not None:
            lp = lpips(a, b, net=lpips_net)
        rows.append({
            "name": name, "prompt": acc["prompt"], "index": acc["index"], "seed": acc["seed"],
            "psnr_db": psnr(a, b), "psnr_per_frame_db": psnr(a, b, mode="per_frame"),
            "ssim": ssim(a, b) if min(a.shape[1:3]) >= 11 else None, "lpips": lp,
            "density": acc["density"], "video_density": acc["video_density"],
            "dense_denoise_s": den["denoise_s"], "accel_denoise_s": acc["denoise_s"],
            "dense_total_s": den["total_s"], "accel_total_s": acc["total_s"],
            "speedup_denoise": den["denoise_s"] / acc["denoise_s"], "speedup_total": den["total_s"] / acc["total_s"],
        })
    if not rows:
        raise ValueError(f"{root}: no finished dense/{accel_arm} pairs to compare")
    with open(root / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    summary: dict[str, Any] = {
        "root": str(root), "model": manifest["model"], "method": manifest["method"],
        "method_config": manifest.get("method_config"), "dense_warmup": manifest.get("dense_warmup"),
        "tiny_random_weights": manifest.get("tiny_random_weights"), "videos": len(rows), "unpaired": unpaired,
        "lpips_status": lpips_note, "definitions": DEFINITIONS,
    }
    for key in ("psnr_db", "psnr_per_frame_db", "ssim", "lpips", "density", "video_density", "speedup_denoise",
                "speedup_total"):
        summary[key] = _mean_std([r[key] for r in rows])
    summary["speedup_overall"] = sum(r["dense_total_s"] for r in rows) / sum(r["accel_total_s"] for r in rows)
    summary["speedup_overall_denoise"] = (sum(r["dense_denoise_s"] for r in rows)
                                          / sum(r["accel_denoise_s"] for r in rows))
    (root / "fidelity_summary.json").write_text(json.dumps(summary, indent=2))
    log(format_summary(summary))
    return summary


def _lpips_status(status: str) -> str:
    """``LPIPS <why>`` for a status that does not already say LPIPS (``disabled (--no-lpips)``)."""
    return status if status.startswith("LPIPS") else f"LPIPS {status}"


def format_summary(s: dict[str, Any]) -> str:
    def ms(key: str, unit: str = "", digits: int = 3) -> str:
        d = s[key]
        if not d.get("n"):
            return "n/a" + (f" ({d['n_identical']} identical)" if d.get("n_identical") else "")
        txt = f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}{unit} (n={d['n']})"
        return txt + (f", {d['n_identical']} identical" if d.get("n_identical") else "")

    lines = [
        f"{s['model']} / {s['method']}: {s['videos']} paired videos (dense warm-up {s.get('dense_warmup')})",
        f"  PSNR {ms('psnr_db', ' dB', 2)} global; per-frame mean {ms('psnr_per_frame_db', ' dB', 2)}",
        f"  SSIM {ms('ssim', '', 4)}",
        "  " + (f"LPIPS {ms('lpips', '', 4)}" if s["lpips_status"] == "computed" else _lpips_status(s["lpips_status"])),
        f"  density {ms('density')}, video x video {ms('video_density')}",
        f"  speedup {s['speedup_overall']:.3f}x total, {s['speedup_overall_denoise']:.3f}x denoising (sums)",
    ]
    if s.get("tiny_random_weights"):
        lines.append("  (tiny random-weight model: plumbing only, says nothing about quality)")
    if s["unpaired"]:
        lines.append(f"  {len(s['unpaired'])} accelerated videos without a dense partner were skipped")
    return "\n".join(lines)
