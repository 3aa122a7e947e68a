"""Procedural class-conditional images for the reference VAR (no download, deterministic).

36 classes = 4 shapes (disc, square, triangle, ring) x 3 colours (red, green, blue) x 3 placements (top-left
small, centre large, bottom-right small), each over a fixed grey texture chosen by the shape (horizontal stripes,
checker, vertical stripes, diagonal gradient). Class ``c`` is shape ``c // 9``, colour ``(c // 3) % 3``,
placement ``c % 3``. Images are (3, S, S) in [-1, 1].

**Every class names exactly one image.** This is deliberate: the model is a paired-fidelity fixture (LiteVAR vs
dense with the same generator). When a class has several equally likely images, the early scales' token
distributions are multi-modal, and any perturbation of the logits (W8A8 alone, KL ~0.01 nats/token) moves the
sampler across a mode boundary in some images, which then diverge completely. PSNR vs dense then measures the
sampler's ties, not LiteVAR's error (measured in BENCHMARKS.md: 18.7 dB with random positions and textures, 20.6 dB
with 18 discrete placements per class). With one image per class, the dense sample is (nearly) deterministic and a
token only flips when LiteVAR moves a confident prediction.
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = ("disc", "square", "triangle", "ring")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95)}
#: placement name -> (centre x, centre y, radius) in units of a 32 px frame
PLACEMENTS = {"top-left": (10.0, 10.0, 6.0), "centre": (16.0, 16.0, 9.0), "bottom-right": (22.0, 22.0, 6.0)}
CLASS_NAMES = tuple(f"{c} {s} {p}" for s in SHAPES for c in COLOURS for p in PLACEMENTS)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32


def class_parts(label: int) -> tuple[str, str, str]:
    """(shape, colour, placement) of class ``label``."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} not in [0, {NUM_CLASSES})")
    return SHAPES[label // 9], list(COLOURS)[(label // 3) % 3], list(PLACEMENTS)[label % 3]


def other_placement(label: int) -> int:
    """The class with the same shape and colour at the next placement (a "wrong image" reference)."""
    return label - label % 3 + (label % 3 + 1) % 3


def _background(shape: str, S: int) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) * (32 / S)
    if shape == "disc":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * yy / 8)
    elif shape == "square":
        t = ((xx // 4 + yy // 4) % 2).astype(np.float32)
    elif shape == "triangle":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * xx / 8)
    else:
        t = (xx + yy) / 62
    return np.repeat((0.35 + 0.3 * t)[None], 3, 0)


def _shape_mask(shape: str, cx: float, cy: float, r: float, S: int) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "disc":
        return (dx**2 + dy**2 <= r**2).astype(np.float32)
    if shape == "square":
        return ((np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)).astype(np.float32)
    if shape == "triangle":  # upward isosceles triangle
        top, bot = cy - r, cy + r
        half = (yy - top) / (2 * r) * r
        return ((yy >= top) & (yy <= bot) & (np.abs(dx) <= half)).astype(np.float32)
    if shape == "ring":
        d2 = dx**2 + dy**2
        return ((d2 <= r**2) & (d2 >= (0.55 * r) ** 2)).astype(np.float32)
    raise ValueError(f"unknown shape {shape!r}; available: {SHAPES}")


def render(label: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The (3, size, size) float32 image in [0, 1] of class ``label``."""
    shape, colour, placement = class_parts(label)
    cx, cy, r = (v * size / 32 for v in PLACEMENTS[placement])
    m = _shape_mask(shape, cx, cy, r, size)[None]
    rgb = np.asarray(COLOURS[colour], np.float32)[:, None, None]
    return (_background(shape, size) * (1 - m) + rgb * m).astype(np.float32)


def make_dataset(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) in [-1, 1] and labels (n,): classes balanced, order shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    table = np.stack([render(c, size) for c in range(NUM_CLASSES)])
    return torch.from_numpy(table[labels]).mul(2).sub(1), torch.from_numpy(labels).long()
