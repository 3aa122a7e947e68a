"""Procedural class-conditional images for the reference VAR (no download, deterministic by seed).

12 classes = 4 shapes (disc, square, triangle, ring) x 3 colours (red, green, blue), drawn at a random position,
size and shade over a random grey texture (stripes, checker or smooth noise). Images are (3, S, S) in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = ("disc", "square", "triangle", "ring")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95)}
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    kind = rng.integers(3)
    lo, hi = sorted(rng.uniform(0.25, 0.75, 2))
    if kind == 0:  # stripes at a random angle / period
        a, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    elif kind == 1:  # checker
        c = int(rng.integers(3, 8))
        t = ((xx // c + yy // c) % 2).astype(np.float32)
    else:  # smooth noise: a coarse random grid, bilinearly upsampled
        g = rng.uniform(0, 1, (5, 5)).astype(np.float32)
        idx = np.linspace(0, 4, S)
        i0 = np.floor(idx).astype(int).clip(0, 3)
        f = (idx - i0)[:, None]
        rows = g[i0] * (1 - f) + g[i0 + 1] * f
        t = rows[:, i0] * (1 - f.T) + rows[:, i0 + 1] * f.T
    grey = lo + (hi - lo) * t
    return np.repeat(grey[None], 3, 0)


def _shape_mask(shape: str, rng: np.random.Generator, S: int) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    r = rng.uniform(0.18, 0.3) * S
    cx, cy = rng.uniform(r, S - r, 2)
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


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (3, size, size) float32 image in [0, 1] of class ``label``."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} not in [0, {NUM_CLASSES})")
    shape, colour = SHAPES[label // len(COLOURS)], list(COLOURS)[label % len(COLOURS)]
    img = _background(rng, size)
    m = _shape_mask(shape, rng, size)[None]
    rgb = np.clip(np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.8, 1.1) + rng.normal(0, 0.03, 3), 0, 1)
    return (img * (1 - m) + rgb[:, None, None].astype(np.float32) * m).astype(np.float32)


def make_dataset(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) in [-1, 1] and labels (n,), classes balanced, deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    imgs = np.stack([render(int(lb), rng, size) for lb in labels])
    return torch.from_numpy(imgs).mul(2).sub(1), torch.from_numpy(labels).long()
