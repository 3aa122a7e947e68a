"""Video output of comparisons: labelled side-by-side frames and a video writer that replaces a file only on
success."""

from __future__ import annotations

from pathlib import Path

import imageio
import numpy as np
from PIL import Image, ImageDraw

from .cli_checks import replace_on_success


def _label_strip(text: str, width: int, height: int = 20) -> np.ndarray:
    img = Image.new("RGB", (width, height), (24, 24, 24))
    ImageDraw.Draw(img).text((4, 4), text, fill=(240, 240, 240))
    return np.asarray(img)


def side_by_side_frames(a: np.ndarray, b: np.ndarray, labels: tuple[str, str]) -> np.ndarray:
    """uint8 (F, H', W', 3) frames: ``a`` left, ``b`` right, labelled, padded to multiples of 16 for codecs."""
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    to8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    Fn, H, W, _ = a.shape
    gap = np.full((Fn, H, 4, 3), 255, np.uint8)
    body = np.concatenate([to8(a), gap, to8(b)], axis=2)
    strip = np.concatenate(
        [_label_strip(labels[0], W), np.full((20, 4, 3), 255, np.uint8), _label_strip(labels[1], W)], axis=1
    )
    frames = np.concatenate([np.broadcast_to(strip, (Fn, *strip.shape)), body], axis=1)
    ph, pw = (-frames.shape[1]) % 16, (-frames.shape[2]) % 16
    return np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)))


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``frames`` (uint8 or float in [0, 1]) to a temporary file beside ``path`` and move it into place only
    when the write succeeds, so a failed write leaves an earlier file intact."""
    path = Path(path)
    with replace_on_success(path) as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=16)
    return path
