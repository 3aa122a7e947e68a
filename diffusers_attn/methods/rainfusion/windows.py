"""Tile-order block lists and the per-shape solver that makes ``sparsity`` mean executed sparsity.

With the video tokens in spatio-temporal tiles (``TokenLayout.order``), each block of consecutive tokens is a compact
3-D box, so a pattern's window around a query block is a union of boxes and the key blocks it needs are the ones whose
box meets it. Boxes are the bounding boxes of each block's video tokens with t >= 1 (exact for blocks inside one
tile; a block straddling tiles gets its bounding box, which can only add keys: correctness never depends on it, the
executed mask is whatever the lists say, and the density is counted from the lists).

:func:`solve_params` picks, per pattern, the densest window whose *executed* video x video density (first frame,
text and block rounding included) stays within ``1 - sparsity``, and says when no window can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...kernels import num_blocks
from ...layout import TokenLayout
from .config import PatternParams

_BIG = 1 << 30


@dataclass
class BlockBoxes:
    """Each block's S tokens (video, t >= 1) as a few boxes: one per tile the block touches (runs of consecutive
    tokens of one tile are boxes in tile order), so a block straddling two tiles is two boxes, not their hull."""

    lo: torch.Tensor  # (n_boxes, 3) t, h, w minimum
    hi: torch.Tensor  # (n_boxes, 3) maximum
    owner: torch.Tensor  # (n_boxes,) block index
    n_blocks: int

    @classmethod
    def of(cls, coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor], s_tok: torch.Tensor, block: int,
           n_blocks: int, tile: tuple[int, int, int] | None = None) -> "BlockBoxes":
        t, h, w = coords
        pos = torch.arange(t.numel())[s_tok]
        b = pos // block
        if tile is None:
            part = b
        else:
            tt, th, tw = tile
            tid = (((t[s_tok] - 1) // tt) * (1 << 20) + (h[s_tok] // th) * (1 << 10) + w[s_tok] // tw)
            part = b * (1 << 40) + tid
        # a new box wherever the (block, tile) pair changes along the sequence
        new = torch.ones_like(part, dtype=torch.bool)
        new[1:] = part[1:] != part[:-1]
        seg = torch.cumsum(new.long(), 0) - 1
        n = int(seg[-1]) + 1 if seg.numel() else 0
        xyz = torch.stack([t[s_tok], h[s_tok], w[s_tok]], dim=1)
        lo = torch.full((n, 3), _BIG, dtype=torch.long).scatter_reduce_(0, seg[:, None].expand(-1, 3), xyz, "amin")
        hi = torch.full((n, 3), -_BIG, dtype=torch.long).scatter_reduce_(0, seg[:, None].expand(-1, 3), xyz, "amax")
        owner = torch.zeros(n, dtype=torch.long).scatter_reduce_(0, seg, b, "amax", include_self=False)
        return cls(lo, hi, owner, n_blocks)

    def incidence(self) -> torch.Tensor:
        """(n_blocks, n_boxes) one-hot of each box's block."""
        m = torch.zeros(self.n_blocks, self.lo.shape[0])
        m[self.owner, torch.arange(self.lo.shape[0])] = 1.0
        return m


def _overlap(q: BlockBoxes, k: BlockBoxes, axis: int, radius: int) -> torch.Tensor:
    """(Bq, Bk) boxes: the query box widened by ``radius`` on ``axis`` meets the key box on that axis."""
    return (q.lo[:, None, axis] - radius <= k.hi[None, :, axis]) & (k.lo[None, :, axis] <= q.hi[:, None, axis] + radius)


def _to_blocks(q: BlockBoxes, k: BlockBoxes, need: torch.Tensor) -> torch.Tensor:
    return (q.incidence() @ need.float() @ k.incidence().T) > 0


def spatial_mask(q: BlockBoxes, k: BlockBoxes, window: int, edge_radius: int) -> torch.Tensor:
    """Frames within ``window`` of the query, plus the next frames within ``edge_radius`` rows and columns."""
    need = _overlap(q, k, 0, window)
    if edge_radius >= 0:
        need |= _overlap(q, k, 0, window + 1) & _overlap(q, k, 1, edge_radius) & _overlap(q, k, 2, edge_radius)
    return _to_blocks(q, k, need)


def temporal_mask(q: BlockBoxes, k: BlockBoxes, rows: int, cols: int | None) -> torch.Tensor:
    """Every frame, rows within ``rows`` (and columns within ``cols``) of the query."""
    need = _overlap(q, k, 1, rows)
    if cols is not None:
        need &= _overlap(q, k, 2, cols)
    return _to_blocks(q, k, need)


class DensityMeter:
    """Exact executed video x video density of a block mask (or a textural stride) for one layout."""

    def __init__(self, layout: TokenLayout, block_m: int, block_n: int) -> None:
        N = layout.seq_len
        self.num_m, self.num_k = num_blocks(N, block_m), num_blocks(N, block_n)
        t, h, w, txt = layout.token_coords()
        vid, s_tok = t >= 0, t >= 1
        dense_tok = (vid & (t == 0)) | txt
        pos = torch.arange(N)
        qb, kb = pos // block_m, pos // block_n
        self.q = BlockBoxes.of((t, h, w), s_tok, block_m, self.num_m, layout.order)
        self.k = BlockBoxes.of((t, h, w), s_tok, block_n, self.num_k, layout.order)
        self.q_dense = torch.zeros(self.num_m, dtype=torch.bool)
        self.q_dense[qb[dense_tok]] = True
        self.k_always = torch.zeros(self.num_k, dtype=torch.bool)
        self.k_always[kb[dense_tok]] = True
        self.vrows = np.bincount(qb[vid].numpy(), minlength=self.num_m).astype(np.float64)
        self.vkeys = np.bincount(kb[vid].numpy(), minlength=self.num_k).astype(np.float64)
        self.nv2 = float(layout.num_video) ** 2
        self.hw, self.n_s, self.num_video = layout.frame_tokens, int(s_tok.sum()), layout.num_video
        self.h, self.w = h, w
        self.s_tok = s_tok

    def with_forced(self, need: torch.Tensor) -> torch.Tensor:
        return need | self.k_always[None, :] | self.q_dense[:, None]

    def video_density(self, mask: torch.Tensor) -> float:
        return float(self.vrows @ mask.numpy().astype(np.float64) @ self.vkeys) / self.nv2

    def textural_density(self, s_h: int, s_w: int) -> float:
        strided = int((self.s_tok & (self.h % s_h == 0) & (self.w % s_w == 0)).sum())
        return float(self.hw * self.num_video + self.n_s * (self.hw + strided)) / self.nv2


def _last_within(densities, budget: float) -> int:
    """Index of the last candidate whose density is within ``budget`` (candidates ordered by density; -1 if none).
    Binary search: ``densities(i)`` is evaluated O(log n) times."""
    lo, hi = 0, densities.n - 1
    if densities(0) > budget + 1e-12:
        return -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if densities(mid) <= budget + 1e-12:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Seq:
    def __init__(self, n: int, fn) -> None:
        self.n, self._fn, self._cache = n, fn, {}

    def __call__(self, i: int) -> float:
        if i not in self._cache:
            self._cache[i] = self._fn(i)
        return self._cache[i]


@dataclass(frozen=True)
class Solution:
    params: PatternParams
    budget: float
    met: dict[str, bool]  # pattern -> whether its executed density is within the budget


def solve_params(layout: TokenLayout, sparsity: float, block_m: int, block_n: int, *,
                 window: int | None = None, rows: int | None = None, stride: int | None = None) -> Solution:
    """The densest tile-order windows whose executed video density is within ``1 - sparsity``; explicit
    ``window`` / ``rows`` / ``stride`` are kept as given."""
    T, H, W = layout.grid
    meter = DensityMeter(layout, block_m, block_n)
    budget = 1.0 - float(sparsity)
    span = max(H, W)

    # Spatial: (w, R) in density order: w frames on each side, then the next frames within radius R.
    sp = [(w, r) for w in range(T) for r in range(-1, span)] if window is None else [(window, -1)]
    sp_seq = _Seq(len(sp), lambda i: meter.video_density(meter.with_forced(spatial_mask(meter.q, meter.k, *sp[i]))))
    i_sp = _last_within(sp_seq, budget)
    # Temporal: every frame, a window of r_h rows and r_w columns growing alternately: (0,0), (0,1), (1,1), ...
    tp = [(i // 2, (i + 1) // 2) for i in range(2 * span)] if rows is None else [(rows, None)]
    tp_seq = _Seq(len(tp), lambda i: meter.video_density(meter.with_forced(temporal_mask(meter.q, meter.k, *tp[i]))))
    i_tp = _last_within(tp_seq, budget)
    # Textural: anisotropic strides, densest within the budget, squarest among equals.
    if stride is None:
        tx = sorted(((meter.textural_density(a, b), -abs(a - b), a, b) for a in range(1, 9) for b in range(1, 9)
                     if (a, b) != (1, 1)), reverse=True)
        ok = [c for c in tx if c[0] <= budget + 1e-12]
        pick = ok[0] if ok else tx[-1]
        s_h, s_w = pick[2], pick[3]
    else:
        s_h = s_w = stride
    w_, r_edge = sp[max(i_sp, 0)]
    r_h, r_w = tp[max(i_tp, 0)]
    params = PatternParams(window=w_, rows=r_h, stride=s_h, edge_radius=r_edge, cols=r_w,
                           stride_w=None if s_w == s_h else s_w)
    met = {
        "spatial": i_sp >= 0,
        "temporal": i_tp >= 0,
        "textural": meter.textural_density(s_h, s_w) <= budget + 1e-12,
    }
    return Solution(params, budget, met)
