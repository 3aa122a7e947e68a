"""What the demo shows of a finished comparison: JSON figures, the Markdown summary, latency captions, the
per-layer/head pattern figure and VAR's row of images."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..compare import ComparisonResult
from ..stats import AttentionStats

PATTERN_COLORS = {
    "dense": (140, 140, 140),
    "spatial": (66, 133, 244),
    "temporal": (244, 160, 0),
    "textural": (15, 157, 88),
    "fallback": (70, 70, 70),
}
PATTERN_LABELS = {"dense": "dense (ARM)", "spatial": "Spatial", "temporal": "Temporal", "textural": "Textural",
                  "fallback": "dense (warm-up / dense layer / fallback)"}


def to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_row(frames: np.ndarray, gap: int = 4) -> np.ndarray:
    """(N, H, W, 3) images -> one (H, N W + gaps, 3) image, white gaps between them."""
    if frames.shape[0] == 1:
        return frames[0]
    sep = np.ones((frames.shape[1], gap, 3), dtype=frames.dtype)
    parts = []
    for i, f in enumerate(frames):
        parts += ([sep] if i else []) + [f]
    return np.concatenate(parts, axis=1)


def latency_caption(label: str, denoise_s: float, total_s: float, phase: str = "denoising") -> str:
    return f"**{label}** — {phase} latency **{denoise_s:.3f} s**, total latency **{total_s:.3f} s**"


def _fmt_db(x: float) -> str:
    return "identical (infinite PSNR)" if math.isinf(x) else f"{x:.2f} dB"


def speedup_line(result: ComparisonResult, phase: str = "denoising") -> str:
    """The speedup, or why there is none to report (nothing ran sparse, or a model too small to time)."""
    if result.speedup_withheld:
        return f"**Speedup:** not reported: {result.speedup_withheld}  "
    n = len(result.dense.total_times or [0])
    lo, hi = result.speedup_range
    spread = f" (median of {n} runs; {lo:.2f}-{hi:.2f}x)" if n > 1 else ""
    return f"**Speedup:** {result.speedup:.2f}x total{spread}, {result.denoise_speedup:.2f}x {phase}  "


def summarize(result: ComparisonResult, kind: str = "video") -> dict[str, Any]:
    """JSON-friendly figures of one comparison (also the API output). For images (VAR) ``density`` is the kept
    attention share of the masks and ``computed_score_share`` what was computed (CFG sharing halves it)."""
    finite = lambda x: None if math.isinf(x) else x  # noqa: E731 - JSON has no inf
    if kind == "image":
        st = result.stats
        return {
            "dense_sampling_s": result.dense.denoise_s,
            "dense_total_s": result.dense.total_s,
            "accelerated_sampling_s": result.accelerated.denoise_s,
            "accelerated_total_s": result.accelerated.total_s,
            "speedup_total": result.speedup,
            "speedup_sampling": result.denoise_speedup,
            "speedup_withheld": result.speedup_withheld,
            "psnr_db": finite(result.psnr_db),
            "psnr_per_image_db": result.psnr_per_frame_db,  # mean over the images that differ
            "identical_images": result.identical_frames,
            "identical": math.isinf(result.psnr_db),
            "ssim": result.ssim,
            "density": st.video_density,
            "computed_score_share": st.density,
            "kept_share_per_scale": {str(k): v for k, v in
                                     (st.info.get("kept_attention_share_per_scale") or {}).items()},
            "computed_score_share_per_scale": {str(k): v for k, v in
                                               (st.info.get("computed_score_share_per_scale") or {}).items()},
            "kernel_calls": dict(st.kernel_backends),
            "quantized_layers": len(st.info.get("quantized_layers") or []),
            "settings": {k: v for k, v in result.settings.items() if isinstance(v, (int, float, str, bool))},
        }
    return {
        "dense_denoise_s": result.dense.denoise_s,
        "dense_total_s": result.dense.total_s,
        "accelerated_denoise_s": result.accelerated.denoise_s,
        "accelerated_total_s": result.accelerated.total_s,
        "speedup_total": result.speedup,
        "speedup_denoise": result.denoise_speedup,
        "speedup_withheld": result.speedup_withheld,
        "psnr_db": finite(result.psnr_db),
        "psnr_per_frame_db": result.psnr_per_frame_db,  # mean over the frames that differ
        "identical_frames": result.identical_frames,
        "ssim": result.ssim,
        "density": result.stats.density,
        "video_density": result.stats.video_density,
        "pattern_histogram": result.stats.pattern_histogram,
        "pattern_video_density": result.stats.pattern_video_density,
        "dense_fallbacks": result.stats.dense_fallbacks,
        "settings": {k: v for k, v in result.settings.items() if isinstance(v, (int, float, str, bool))},
    }


def summary_markdown(result: ComparisonResult, label: str, kind: str = "video",
                     method_report: dict[str, Any] | None = None) -> str:
    s = result.settings
    if kind == "image":
        return _summary_markdown_image(result, label)
    lines = [
        "| | Dense | " + label + " |",
        "|---|---|---|",
        f"| Denoising latency | {result.dense.denoise_s:.3f} s | {result.accelerated.denoise_s:.3f} s |",
        f"| Total latency (with VAE decode) | {result.dense.total_s:.3f} s | {result.accelerated.total_s:.3f} s |",
        "",
        speedup_line(result, "denoising"),
        f"**PSNR** vs dense: {_fmt_db(result.psnr_db)} (global MSE), {result.per_frame_text('frame')}  ",
        f"**SSIM** vs dense: {result.ssim:.4f} (Gaussian 11x11, sigma 1.5, RGB channels averaged)  ",
        f"**Realized density:** {result.stats.density:.3f} of dense (all tokens), {result.stats.video_density:.3f} "
        "(video x video)  ",
        *_pattern_density_lines(result.stats),
        f"{s['device']} {s['dtype']}, seed {s['seed']}, warm-up run excluded from timing: {s['warmup']}",
    ]
    rep = method_report or {}
    if "per_layer_error_before" in rep:
        b = list(rep["per_layer_error_before"].values())
        a = list(rep["per_layer_error_after"].values())
        if b:
            lines.append(f"**FEAT distillation** ({rep['distill_steps']} steps on {rep['distill_inputs']} "
                         f"transformer inputs of this prompt, {rep['distill_seconds']:.1f} s): mean per-layer "
                         f"relative error {np.mean(b):.4f} -> {np.mean(a):.4f}  ")
        else:
            lines.append("**FEAT**: every attention layer is a softmax layer (hybrid), nothing to distil  ")
    if s.get("note"):
        lines.append(f"\n_Note: {s['note']}._")
    return "\n".join(lines)


def _summary_markdown_image(result: ComparisonResult, label: str) -> str:
    s, st = result.settings, result.stats
    lines = [
        "| | Dense | " + label + " |",
        "|---|---|---|",
        f"| Sampling latency (all scales) | {result.dense.denoise_s:.3f} s | {result.accelerated.denoise_s:.3f} s |",
        f"| Total latency (with VQVAE decode) | {result.dense.total_s:.3f} s | {result.accelerated.total_s:.3f} s |",
        "",
        speedup_line(result, "sampling"),
        f"**PSNR** vs dense: {_fmt_db(result.psnr_db)} (global MSE over all images), "
        f"{result.per_frame_text('image')}  ",
        f"**SSIM** vs dense: {result.ssim:.4f} (Gaussian 11x11, sigma 1.5, RGB channels averaged)  ",
        f"**Kept attention share:** {st.video_density:.3f} of dense (masks); attention scores computed: "
        f"{st.density:.3f} (CFG sharing computes one map for both halves)  ",
        f"{s['device']} {s['dtype']}, seed {s['seed']}, warm-up run excluded from timing: {s['warmup']}",
    ]
    if s.get("note"):
        lines.append(f"\n_Note: {s['note']}._")
    return "\n".join(lines)


def _pattern_density_lines(stats: AttentionStats) -> list[str]:
    if not stats.pattern_video_density:
        return []
    per = ", ".join(f"{k} {v:.3f}" for k, v in stats.pattern_video_density.items())
    return [f"**Executed video density per pattern:** {per}  "]


def pattern_plot(stats: AttentionStats, cell_w: int = 30, cell_h: int = 18) -> np.ndarray | None:
    """RGB image: one row per attention layer, one cell per head, each cell split by the share of calls that ran
    each pattern (Spatial, Temporal, Textural, dense); drawn at 2x. ``None`` when the method records no per-head
    patterns."""
    layers = [layer for layer in stats.layers if layer.head_patterns]
    if not layers:
        return None
    heads = max(len(layer.head_patterns) for layer in layers)
    left, top, legend_h = 70, 40, 22 * len(PATTERN_COLORS) + 8
    width = max(left + heads * cell_w + 10, 360)
    height = top + len(layers) * cell_h + legend_h + 10
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), "share of calls per pattern", fill=(0, 0, 0))
    for h in range(heads):
        draw.text((left + h * cell_w + 2, top - 13), f"h{h}", fill=(80, 80, 80))
    for r, layer in enumerate(layers):
        y = top + r * cell_h
        draw.text((4, y + 3), f"layer {layer.layer}", fill=(0, 0, 0))
        for h, counts in enumerate(layer.head_patterns):
            total = sum(counts.values())
            x = left + h * cell_w
            if not total:
                continue
            for name in PATTERN_COLORS:
                n = counts.get(name, 0)
                if not n:
                    continue
                w = round((cell_w - 2) * n / total)
                draw.rectangle([x, y, x + max(w, 1) - 1, y + cell_h - 3], fill=PATTERN_COLORS[name])
                x += w
    y = top + len(layers) * cell_h + 8
    for name, color in PATTERN_COLORS.items():
        draw.rectangle([4, y, 18, y + 12], fill=color)
        draw.text((24, y), PATTERN_LABELS[name], fill=(0, 0, 0))
        y += 22
    return np.asarray(img.resize((img.width * 2, img.height * 2), Image.NEAREST))  # crisp at page scale
