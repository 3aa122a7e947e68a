"""Deterministic procedural video clips (no download): shapes that move, spin or change colour over textures.

Every clip is drawn from a small grammar and captioned by it::

    "<colour> <shape> <motion> over <background>"      e.g. "red square moves right over checker"

* colour: red, green, blue, yellow, or ``changing`` (the hue cycles through the clip)
* shape: circle, square, triangle (each carries a dark stripe through its centre, so rotation is visible)
* motion: ``moves left|right|up|down`` (travels about half the frame) or ``spins`` (rotates in place)
* background: stripes, checker, dots (muted colours, random phase/scale per clip)

Clips are float32 RGB in [-1, 1], shaped (F, 3, S, S). Rendering is analytic (signed distances with a soft edge),
so a clip is a pure function of its :class:`ClipSpec`, and :func:`sample_batch` is a pure function of its seed.
Captions become fixed text embeddings with :func:`diffusers_attn.pipelines.tiny.prompt_embeddings` (one seeded
vector per word), so no text encoder is needed at training or inference time.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
import torch

COLOURS = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.62}  # hue in [0, 1)
COLOUR_WORDS = (*COLOURS, "changing")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "spins")
BACKGROUNDS = ("stripes", "checker", "dots")


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (the caption words plus the continuous nuisance parameters)."""

    colour: str
    shape: str
    motion: str
    background: str
    x0: float  # start centre, in units of the frame size
    y0: float
    angle0: float  # radians
    spin: float  # total rotation over the clip, radians (sign = direction)
    hue0: float  # start hue for "changing"
    bg_hue: float
    bg_scale: float  # texture period, in units of the frame size
    bg_phase: float
    bg_angle: float

    @property
    def caption(self) -> str:
        verb = "spins" if self.motion == "spins" else f"moves {self.motion}"
        return f"{self.colour} {self.shape} {verb} over {self.background}"


def caption_vocabulary() -> list[str]:
    """All captions the grammar can produce (5 x 3 x 5 x 3 = 225)."""
    out = []
    for c in COLOUR_WORDS:
        for s in SHAPES:
            for m in MOTIONS:
                for b in BACKGROUNDS:
                    verb = "spins" if m == "spins" else f"moves {m}"
                    out.append(f"{c} {s} {verb} over {b}")
    return out


def random_spec(rng: np.random.Generator) -> ClipSpec:
    motion = MOTIONS[rng.integers(len(MOTIONS))]
    # Keep the shape inside the frame for the whole clip: travel 0.45 of the frame along the motion axis.
    lo, hi = 0.22, 0.78
    x0, y0 = rng.uniform(lo, hi, size=2)
    if motion == "left":
        x0 = rng.uniform(lo + 0.45, hi)
    elif motion == "right":
        x0 = rng.uniform(lo, hi - 0.45)
    elif motion == "up":
        y0 = rng.uniform(lo + 0.45, hi)
    elif motion == "down":
        y0 = rng.uniform(lo, hi - 0.45)
    elif motion == "spins":
        x0, y0 = rng.uniform(0.35, 0.65, size=2)
    spin = rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0) * math.pi if motion == "spins" else 0.0
    return ClipSpec(
        colour=COLOUR_WORDS[rng.integers(len(COLOUR_WORDS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        motion=motion,
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        x0=float(x0), y0=float(y0), angle0=float(rng.uniform(0, 2 * math.pi)), spin=float(spin),
        hue0=float(rng.uniform()), bg_hue=float(rng.uniform()), bg_scale=float(rng.uniform(0.18, 0.3)),
        bg_phase=float(rng.uniform(0, 2 * math.pi)), bg_angle=float(rng.uniform(0, math.pi)),
    )


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _background(spec: ClipSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    c0 = _rgb(spec.bg_hue, 0.25, 0.35)
    c1 = _rgb(spec.bg_hue + 0.5, 0.2, 0.6)
    k = 2 * math.pi / spec.bg_scale
    if spec.background == "stripes":
        t = 0.5 + 0.5 * np.sin(k * (u * math.cos(spec.bg_angle) + v * math.sin(spec.bg_angle)) + spec.bg_phase)
    elif spec.background == "checker":
        t = 0.5 + 0.5 * np.tanh(4 * np.sin(k * u / 2 + spec.bg_phase) * np.sin(k * v / 2))
    else:  # dots
        d = np.hypot(np.mod(u + spec.bg_phase / k, spec.bg_scale) - spec.bg_scale / 2,
                     np.mod(v, spec.bg_scale) - spec.bg_scale / 2)
        t = np.clip((spec.bg_scale * 0.28 - d) * 60, 0, 1)
    return c0 + t[..., None] * (c1 - c0)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (frame units, negative inside) of a shape of size r centred at 0 in its own frame."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.82 * r
    # equilateral triangle: max over the three edge half-planes
    d = None
    for k in range(3):
        a = math.pi / 2 + 2 * math.pi * k / 3
        e = x * math.cos(a) + y * math.sin(a) - 0.55 * r
        d = e if d is None else np.maximum(d, e)
    return d


def render_clip(spec: ClipSpec, frames: int = 9, size: int = 32) -> np.ndarray:
    """(frames, 3, size, size) float32 in [-1, 1]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = np.meshgrid(coords, coords, indexing="ij")  # v: rows (down), u: columns (right)
    bg = _background(spec, u, v)
    r = 0.2
    travel = 0.45
    edge = 1.0 / size  # soft edge about one pixel wide (anti-aliasing)
    out = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        a = f / max(frames - 1, 1)
        cx, cy = spec.x0, spec.y0
        if spec.motion == "left":
            cx -= travel * a
        elif spec.motion == "right":
            cx += travel * a
        elif spec.motion == "up":
            cy -= travel * a
        elif spec.motion == "down":
            cy += travel * a
        ang = spec.angle0 + spec.spin * a
        dx, dy = u - cx, v - cy
        lx = dx * math.cos(ang) + dy * math.sin(ang)
        ly = -dx * math.sin(ang) + dy * math.cos(ang)
        inside = np.clip(0.5 - _shape_sdf(spec.shape, lx, ly, r) / edge, 0, 1)[..., None]
        hue = COLOURS.get(spec.colour, spec.hue0 + 0.8 * a)  # "changing": the hue sweeps 0.8 of the wheel
        stripe = np.clip(1.5 - np.abs(ly) / (0.18 * r), 0, 1)[..., None]  # dark band along the local x axis
        fg = _rgb(hue, 0.9, 0.95) * (1 - 0.55 * stripe)
        out[f] = bg * (1 - inside) + fg * inside
    return (out.transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)


def sample_batch(seed: int, batch: int, frames: int = 9, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """(batch, frames, 3, size, size) clips in [-1, 1] and their captions; a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(batch)]
    clips = np.stack([render_clip(s, frames, size) for s in specs])
    return torch.from_numpy(clips), [s.caption for s in specs]
