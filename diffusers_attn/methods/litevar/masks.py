"""MDWA masks (multi-diagonal windowed attention): compact per-scale band widths, their expansion, save/load."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

MASK_FORMAT_VERSION = 1


def default_maskable(patch_nums: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """LiteVAR's layout: query scale -> maskable key scales (current first). k = 3: {3, 2}; k = 4: {4, 3, 2};
    k >= 5: {k, ..., 3}. Other keys (scales 0-1 or 0-2) stay full."""
    out = {}
    for k in range(3, len(patch_nums)):
        lo = 2 if k <= 4 else 3
        out[k] = tuple(range(k, lo - 1, -1))
    return out


def band_mask(n_q: int, n_seg: int, w: int, device: Any = None) -> torch.Tensor:
    """Bool (n_q, n_seg): ``|i * n_seg / n_q - j| < w`` in exact integer arithmetic. ``w = 0`` is empty."""
    i = torch.arange(n_q, device=device).view(-1, 1)
    j = torch.arange(n_seg, device=device).view(1, -1)
    return (i * n_seg - j * n_q).abs() < w * n_q


def min_width(n_q: int, n_seg: int, device: Any = None) -> torch.Tensor:
    """Int (n_q, n_seg): the smallest band width whose band contains (i, j) (1 ... n_seg)."""
    i = torch.arange(n_q, device=device).view(-1, 1)
    j = torch.arange(n_seg, device=device).view(1, -1)
    return (i * n_seg - j * n_q).abs() // n_q + 1


class LiteVARMaskSet:
    """Compact MDWA masks: per query scale, ``widths[scale]`` int16 (depth, heads, len(maskable[scale]))."""

    def __init__(self, patch_nums: Sequence[int], depth: int, num_heads: int,
                 widths: Mapping[int, torch.Tensor], maskable: Mapping[int, Sequence[int]] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.depth, self.num_heads = int(depth), int(num_heads)
        self.maskable = {int(k): tuple(int(s) for s in v) for k, v in
                         (maskable if maskable is not None else default_maskable(self.patch_nums)).items()}
        self.widths = {int(k): torch.as_tensor(v).to(torch.int16).cpu() for k, v in widths.items()}
        self.metadata = dict(metadata or {})
        self.ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        self._cache: dict[tuple, torch.Tensor | None] = {}
        self.validate()

    # ----- construction -----
    @classmethod
    def full(cls, patch_nums: Sequence[int], depth: int, num_heads: int,
             maskable: Mapping[int, Sequence[int]] | None = None) -> "LiteVARMaskSet":
        """Every maskable segment FULL (a no-op mask set)."""
        maskable = maskable if maskable is not None else default_maskable(patch_nums)
        widths = {k: torch.tensor([patch_nums[s] ** 2 for s in segs]).expand(depth, num_heads, -1).clone()
                  for k, segs in maskable.items()}
        return cls(patch_nums, depth, num_heads, widths, maskable, {"kind": "full"})

    def validate(self) -> None:
        SN = len(self.patch_nums)
        for k, segs in self.maskable.items():
            if not 0 < k < SN:
                raise ValueError(f"maskable query scale {k} out of range 1..{SN - 1} (scale 0 is never maskable)")
            if any(not 0 < s <= k for s in segs) or len(set(segs)) != len(segs):
                raise ValueError(
                    f"maskable key scales {segs} for query scale {k}: need distinct scales in 1..{k} (scale 0 keys "
                    "always stay visible, so every query keeps at least one key)"
                )
        if set(self.widths) != set(self.maskable):
            raise ValueError(
                f"widths given for scales {sorted(self.widths)}, maskable layout has {sorted(self.maskable)}"
            )
        for k, w in self.widths.items():
            want = (self.depth, self.num_heads, len(self.maskable[k]))
            if tuple(w.shape) != want:
                raise ValueError(f"widths[{k}] has shape {tuple(w.shape)}, expected {want}")
            if (w < 0).any():
                raise ValueError(f"widths[{k}] has negative entries")

    def check_model(self, transformer: Any) -> None:
        cfg = transformer.config
        got = (tuple(cfg.patch_nums), len(transformer.blocks), transformer.num_heads)
        if got != (self.patch_nums, self.depth, self.num_heads):
            raise ValueError(
                f"mask set is for patch_nums={self.patch_nums}, depth={self.depth}, heads={self.num_heads}; the "
                f"model has patch_nums={got[0]}, depth={got[1]}, heads={got[2]}"
            )

    # ----- materialisation -----
    def seg_kind(self, k: int) -> torch.Tensor:
        """(depth, heads, nseg) int: 0 drop, 1 band, 2 full."""
        w = self.widths[k].long()
        n = torch.tensor([self.patch_nums[s] ** 2 for s in self.maskable[k]])
        return torch.where(w == 0, 0, torch.where(w >= n, 2, 1))

    def scale_mask(self, k: int, block: int, device: Any = None) -> torch.Tensor | None:
        """Bool (heads, n_k, cum_k) for query scale ``k`` at ``block``; None when nothing is masked there."""
        key = ("scale", k, block, str(device))
        if key in self._cache:
            return self._cache[key]
        mask = None
        if k in self.widths and (self.seg_kind(k)[block] != 2).any():
            n_q = self.patch_nums[k] ** 2
            mask = torch.ones(self.num_heads, n_q, self.ends[k], dtype=torch.bool)
            for si, s in enumerate(self.maskable[k]):
                bg, n_seg = self.ends[s] - self.patch_nums[s] ** 2, self.patch_nums[s] ** 2
                for h in range(self.num_heads):
                    w = int(self.widths[k][block, h, si])
                    if w < n_seg:
                        mask[h, :, bg : bg + n_seg] = band_mask(n_q, n_seg, w)
            mask = mask.to(device)
        self._cache[key] = mask
        return mask

    def teacher_mask(self, L: int, block: int, device: Any = None) -> torch.Tensor | None:
        """Bool (heads, L, L): block-causal visibility AND the masks, for the teacher-forced forward."""
        key = ("teacher", L, block, str(device))
        if key in self._cache:
            return self._cache[key]
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)])[:L]
        mask = (lvl.view(-1, 1) >= lvl.view(1, -1)).expand(self.num_heads, L, L).clone()
        any_masked = False
        for k in range(len(self.patch_nums)):
            bg, ed = self.ends[k] - self.patch_nums[k] ** 2, self.ends[k]
            if bg >= L:
                break
            m = self.scale_mask(k, block)
            if m is not None:
                any_masked = True
                mask[:, bg:ed, :ed] = m[:, : L - bg, :]
        out = mask.to(device) if any_masked else None
        self._cache[key] = out
        return out

    def kept_share(self, k: int, block: int | None = None) -> float:
        """Share of (query, key) pairs of query scale ``k`` kept (over heads, and blocks unless given)."""
        total = self.patch_nums[k] ** 2 * self.ends[k]
        blocks = range(self.depth) if block is None else [block]
        kept = 0.0
        for b in blocks:
            m = self.scale_mask(k, b)
            kept += float(m.sum()) / self.num_heads if m is not None else total
        return kept / (total * len(blocks))

    # ----- merge / io -----
    def union(self, other: "LiteVARMaskSet") -> "LiteVARMaskSet":
        """Keep what either keeps: max width per entry (FULL wins; DROP only where both drop)."""
        def ident(m: "LiteVARMaskSet") -> tuple:
            return (m.patch_nums, m.depth, m.num_heads, m.maskable)

        if ident(other) != ident(self):
            raise ValueError("cannot merge mask sets of different models / layouts")
        widths = {k: torch.maximum(self.widths[k], other.widths[k]) for k in self.widths}
        return LiteVARMaskSet(self.patch_nums, self.depth, self.num_heads, widths, self.maskable, self.metadata)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = {
            "format": "litevar-masks", "version": str(MASK_FORMAT_VERSION), "patch_nums": json.dumps(self.patch_nums),
            "depth": str(self.depth), "num_heads": str(self.num_heads),
            "maskable": json.dumps({str(k): v for k, v in self.maskable.items()}),
            "metadata": json.dumps(self.metadata, default=str),
        }
        save_file({f"width_scale{k}": v.contiguous() for k, v in self.widths.items()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LiteVARMaskSet":
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "litevar-masks":
                raise ValueError(f"{path}: not a LiteVAR mask file (format={meta.get('format')!r})")
            if int(meta.get("version", 0)) > MASK_FORMAT_VERSION:
                raise ValueError(
                    f"{path}: mask format version {meta['version']} is newer than supported {MASK_FORMAT_VERSION}"
                )
            widths = {int(k[len("width_scale"):]): f.get_tensor(k) for k in f.keys()}
        maskable = {int(k): tuple(v) for k, v in json.loads(meta["maskable"]).items()}
        return cls(json.loads(meta["patch_nums"]), int(meta["depth"]), int(meta["num_heads"]), widths, maskable,
                   json.loads(meta.get("metadata", "{}")))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LiteVARMaskSet)
            and self.patch_nums == other.patch_nums
            and self.maskable == other.maskable
            and self.widths.keys() == other.widths.keys()
            and all(torch.equal(self.widths[k], other.widths[k]) for k in self.widths)
        )

    def summary(self) -> dict[str, Any]:
        out = {}
        for k in sorted(self.widths):
            kind = self.seg_kind(k)
            out[k] = {"drop": int((kind == 0).sum()), "band": int((kind == 1).sum()), "full": int((kind == 2).sum()),
                      "kept_share": round(self.kept_share(k), 4)}
        return out

