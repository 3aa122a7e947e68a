"""Offline MDWA calibration from full-attention maps: per-segment statistics and the width choice."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .masks import min_width


class Recorder:
    """Per-(scale, block) segment statistics of probability maps, summed over calls."""

    def __init__(self, patch_nums: Sequence[int], maskable: Mapping[int, Sequence[int]], prob_floor: float) -> None:
        self.patch_nums = tuple(patch_nums)
        self.maskable = dict(maskable)
        self.ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        self.prob_floor = prob_floor
        self.reset()

    def reset(self) -> None:
        # (scale, block) -> (hist [H, nseg, n_max + 1], seg_mass [H, nseg], total [H])
        self.data: dict[tuple[int, int], list[torch.Tensor]] = {}

    def add(self, k: int, block: int, p: torch.Tensor) -> None:
        p = torch.where(p < self.prob_floor, torch.zeros_like(p), p)
        stats = segment_statistics(p, k, self.maskable[k], self.patch_nums)
        cur = self.data.get((k, block))
        self.data[(k, block)] = list(stats) if cur is None else [a + b for a, b in zip(cur, stats)]


def segment_statistics(p: torch.Tensor, k: int, segs: Sequence[int],
                       patch_nums: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """From probabilities (B, H, n_k, cum_k): per head the mass of each segment by minimal band width
    (H, nseg, n_max + 1), the mass per segment (H, nseg) and the head's total mass (H,), summed over batch and
    queries."""
    ends = np.cumsum([pn * pn for pn in patch_nums]).tolist()
    n_q = patch_nums[k] ** 2
    H = p.shape[1]
    n_max = max(patch_nums[s] ** 2 for s in segs)
    hist = torch.zeros(H, len(segs), n_max + 1, dtype=torch.float64)
    seg_mass = torch.zeros(H, len(segs), dtype=torch.float64)
    for si, s in enumerate(segs):
        n_seg = patch_nums[s] ** 2
        bg = ends[s] - n_seg
        ps = p[..., bg : bg + n_seg].double().sum(0)  # (H, n_q, n_seg)
        dmin = min_width(n_q, n_seg, p.device).expand(H, -1, -1)
        hist[:, si] = torch.zeros(H, n_max + 1, dtype=torch.float64, device=p.device).scatter_add_(
            1, dmin.reshape(H, -1), ps.reshape(H, -1)).cpu()
        seg_mass[:, si] = ps.sum((1, 2)).cpu()
    total = p.double().sum((0, 2, 3)).cpu()
    return hist, seg_mass, total


def choose_widths(hist: torch.Tensor, seg_mass: torch.Tensor, total: torch.Tensor, k: int, segs: Sequence[int],
                  patch_nums: Sequence[int], threshold: float, drop: Sequence[float] | None, special_last: bool,
                  candidates: Sequence[int] | Sequence[Sequence[int]] | None) -> torch.Tensor:
    """Widths (H, nseg) for one (scale, block) from the recorded statistics.

    ``candidates``: None (every width 1 ... n_seg), one list for all segments, or one list per segment.
    """
    per_seg = candidates is not None and len(candidates) > 0 and not isinstance(candidates[0], (int, np.integer))
    H, nseg, _ = hist.shape
    out = torch.zeros(H, nseg, dtype=torch.int16)
    share = seg_mass / total.clamp_min(1e-30)[:, None]
    for h in range(H):
        for si, s in enumerate(segs):
            n_seg = patch_nums[s] ** 2
            if drop is not None:
                if special_last and si == 0:
                    prev = share[h, 1:3].sum() if nseg > 1 else torch.tensor(0.0)
                    dropped = bool(share[h, 0] < drop[0] and prev < drop[0])
                else:
                    dropped = bool(share[h, si] < drop[si])
                if dropped:
                    continue  # width 0 = DROP
            cum = hist[h, si, : n_seg + 1].cumsum(0)  # cum[w] = mass inside band of width w
            need = threshold * float(seg_mass[h, si])
            pool = candidates[si] if per_seg else candidates
            if pool is None:
                cands = torch.arange(1, n_seg + 1)
            else:
                cands = torch.tensor(sorted({int(c) for c in pool if 0 < c <= n_seg}), dtype=torch.long)
            ok = (cum[cands] >= need - 1e-12 * max(need, 1.0)).nonzero()
            out[h, si] = int(cands[ok[0, 0]]) if len(ok) else n_seg  # FULL if no candidate reaches the threshold
    return out

