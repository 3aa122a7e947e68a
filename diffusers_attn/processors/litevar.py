"""LiteVAR for VAR (spec ``var-litevar.md`` B): windowed diagonal attention masks (MDWA), CFG attention sharing
(ASC) and mixed-precision post-training quantization.

* **Masks.** :class:`LiteVARMaskSet` stores, per scale, one int16 tensor ``width[depth, heads, n_segments]``:
  ``0`` = DROP the key segment, ``>= n_seg`` = FULL, otherwise a band ``|i * n_seg / n_q - j| < w`` on raster
  indices. Unlisted key scales are always full ("sinks"); scale 0 is never maskable, so every query keeps a key.
  Produced by :func:`calibrate_litevar`, saved/loaded as safetensors.
* **Execution.** Masked SDPA (PyTorch ``scaled_dot_product_attention`` with a boolean mask). The package's
  block-sparse kernel interface works on whole key blocks, and the bands here are token-level diagonals of tiny
  scales (n_q <= 256), which it cannot express exactly; so masks change the math but *do not skip compute*:
  the kept share is reported in the stats as the share a sparse kernel would need.
* **Mask modes.** ``renormalized`` (default, true sparse attention: -inf before softmax), and the two behaviours
  of the LiteVAR release for parity: ``litevar_quant`` (post-softmax probabilities zeroed, not renormalised) and
  ``litevar_float`` (pre-softmax logits multiplied by 0/1).
* **ASC.** With a CFG batch ``[cond; uncond]``, QK^T and softmax run on the cond half only; the map (masked) is
  applied to each half's own V (one SDPA call with ``[V_cond | V_uncond]`` concatenated on the channel axis).
* **Quantization.** See :mod:`diffusers_attn.processors.litevar_quant`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from ..stats import StatsRecorder
from .litevar_quant import (
    QUANT_PRESETS,
    REAL_QUANT,
    apply_fake_quant,
    apply_int8,
    fake_quant,
    fake_quant_probs,
    remove_fake_quant,
)

logger = logging.getLogger(__name__)

MASK_MODES = ("renormalized", "litevar_quant", "litevar_float")
MASK_FORMAT_VERSION = 1

# Segment-share thresholds below which a segment is DROPped (spec B.2), per query scale, current segment first.
# Scale 9's current segment uses the special rule (share < 0.2 and share(k-1) + share(k-2) < 0.2).
LITEVAR_DROP_TABLE: dict[int, tuple[float, ...]] = {
    3: (0.10, 0.10),
    4: (0.05, 0.05, 0.05),
    5: (0.05, 0.05, 0.05),
    6: (0.05, 0.05, 0.05, 0.03),
    7: (0.05, 0.05, 0.05, 0.05, 0.03),
    8: (0.03, 0.03, 0.03, 0.03, 0.03, 0.02),
    9: (0.2, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05),
}
DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# The release's hand-picked candidate band widths (models/ban_mini_token.py of EkaterinaXie/LiteVAR), by number of
# heads (16 = d16, 30 = d30), query scale and segment (current first). Used with candidate_widths="litevar".
_R = lambda a, b: list(range(a, b, 2))  # noqa: E731
LITEVAR_CANDIDATE_WIDTHS: dict[int, dict[int, list[list[int]]]] = {
    16: {
        3: [[5, 6, 7, 8, 9, 10, 11, 12, 15], [4, 5, 6, 7, 9]],
        4: [[6, 7, 8, 9, 10, 11, 13, 15, 17, 20, 25], [6, 7, 8, 9, 10, 11, 13, 15], [4, 5, 6, 7, 9]],
        5: [[6, 7, 11, 12, 13, 18, 20, 25, 28, 30], [6, 7, 8, 9, 10, 13, 15, 17, 20, 25], [5, 6, 7, 8, 10, 12, 13]],
        6: [[8, 9, 11, 16, 18, 26, 30, 43, 51, 64], [8, 9, 10, 11, 12, 13, 17, 24, 30, 35],
            [6, 7, 8, 9, 10, 15, 20, 25], [6, 7, 9, 11, 13, 16]],
        7: [[11, 20, 21, 22, 25, 30, 50, 64, 75, 85, 90, 100], [9, 10, 13, 18, 20, 31, 46, 51, 64],
            [7, 9, 10, 12, 20, 25, 30, 36], [7, 8, 9, 10, 11, 15, 18, 20, 25], [6, 7, 9, 11, 13, 16]],
        8: [[14, 15, 28, 35, 39, 42, 50, 57, 64, 70, 85, 100, 125, 150, 169],
            [11, 12, 20, 23, 24, 30, 35, 45, 64, 70, 80, 90, 100], [9, 15, 17, 20, 32, 48, 51, 64],
            [6, 7, 9, 11, 13, 15, 19, 26, 30, 35], [6, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25], _R(5, 16)],
        9: [[16, 17, 18, 20, 30, 34, 37, 45, 47, 48, 50, 64, 75, 100, 125, 150, 175, 200, 225, 256],
            [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 75, 100, 169],
            [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 85, 100], [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 64],
            _R(5, 36), _R(5, 25), _R(5, 16)],
    },
    30: {
        3: [[5, 6, 7, 8, 9, 10, 11, 12, 13, 16], [5, 6, 7, 8, 9]],
        4: [[6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 25], [6, 7, 8, 9, 10, 11, 12, 13, 15, 16],
            [5, 6, 7, 8, 9]],
        5: [[6, 8, 10, 12, 13, 16, 18, 22, 24, 26, 28, 30, 35, 36], [6, 8, 10, 11, 12, 13, 14, 16, 17, 18, 20, 25],
            [6, 7, 8, 9, 10, 11, 12, 13, 15, 16]],
        6: [[8, 9, 10, 13, 15, 16, 17, 20, 23, 24, 26, 40, 41, 42, 43, 44, 46, 48, 50, 64],
            [5, 9, 10, 11, 13, 14, 16, 17, 23, 24, 25, 26, 27, 29, 30, 35],
            [7, 8, 9, 11, 13, 14, 15, 16, 17, 18, 20, 25], [5, 7, 9, 11, 12, 13, 16]],
        7: [[11, 20, 22, 25, 28, 30, 32, 35, 37, 40, 51, 56, 60, 64, 75, 85, 90, 100],
            [8, 10, 13, 15, 16, 18, 20, 22, 24, 25, 30, 32, 38, 40, 42, 43, 44, 46, 48, 49, 50, 51, 64],
            [6, 9, 10, 11, 13, 14, 17, 19, 21, 23, 25, 27, 28, 29, 35], [5, 6, 8, 11, 12, 14, 15, 17, 19, 20, 25],
            [5, 7, 9, 11, 12, 13, 16]],
        8: [[16, 19, 24, 27, 29, 31, 37, 39, 40, 41, 50, 52, 54, 58, 63, 70, 85, 100, 125, 150, 169],
            [13, 19, 21, 23, 25, 27, 29, 31, 32, 33, 35, 36, 40, 42, 44, 54, 56, 57, 59, 60, 64, 70, 80, 90, 100],
            [8, 10, 13, 15, 17, 19, 21, 22, 23, 24, 26, 28, 31, 35, 38, 40, 42, 44, 46, 48, 50, 51, 60, 64],
            [6, 8, 10, 11, 13, 14, 16, 19, 21, 23, 25, 26, 27, 28, 29, 30, 35],
            [6, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25], _R(5, 16)],
        9: [[16, 17, 32, 33, 34, 37, 48, 49, 50, 52, 54, 60, 64, 75, 100, 125, 150, 175, 200, 225, 256],
            [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 75, 100, 169],
            [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 85, 100], [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 64],
            _R(5, 36), _R(5, 25), _R(5, 16)],
    },
}
del _R

# LiteVAR's calibration set: 20 batches of 8 consecutive classes starting at these (cfg 4, top_k 900, top_p .95).
LITEVAR_CALIBRATION_STARTS = (10, 50, 88, 100, 150, 187, 272, 380, 429, 480, 522, 597, 630, 680, 750, 790, 850, 880,
                              900, 972)


def litevar_calibration_labels() -> list[int]:
    return [s + i for s in LITEVAR_CALIBRATION_STARTS for i in range(8)]


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


@dataclass
class LiteVARConfig:
    """LiteVAR settings (spec B.6).

    Args:
        masks: a :class:`LiteVARMaskSet`, a path to a saved one, or None (no MDWA).
        mask_mode: ``"renormalized"`` (default), ``"litevar_quant"`` or ``"litevar_float"`` (release parity).
        share_cfg_attention: ASC: the unconditional half reuses the conditional half's attention map.
        share_cfg_scales / share_cfg_blocks: restrict ASC to these scale / block indices (None = all).
        quant: None, a fake-quant preset (``w8a8``, ``w6a6``, ``w4a8``, ``w4a6``, ``w4a4``: attention 8-bit;
            ``w8a8_fp16attn``) or ``"int8"`` (real int8 GEMMs via ``torch._int_mm``, CUDA only).
        attn_bits: override the preset's attention bits (Q, K, V and softmax probabilities); None keeps it.
        quant_exclude: substrings of linear names kept in 16 bit (``ffn.fc2``: LiteVAR's sensitivity finding).
        parity_divisor: fake-quant with divisor 2^b as the release (default 2^b - 1).
    """

    masks: LiteVARMaskSet | str | os.PathLike | None = None
    mask_mode: str = "renormalized"
    share_cfg_attention: bool = False
    share_cfg_scales: Sequence[int] | None = None
    share_cfg_blocks: Sequence[int] | None = None
    quant: str | None = None
    attn_bits: int | None = None
    quant_exclude: Sequence[str] = ("ffn.fc2",)
    parity_divisor: bool = False

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode {self.mask_mode!r}: choose one of {MASK_MODES}")
        if self.quant is not None:
            self.quant = self.quant.lower()
            if self.quant not in QUANT_PRESETS and self.quant not in REAL_QUANT:
                raise ValueError(
                    f"quant {self.quant!r}: choose None, one of {tuple(QUANT_PRESETS)} (fake-quant) or 'int8'"
                )
        if self.attn_bits is not None and not 2 <= self.attn_bits <= 16:
            raise ValueError("attn_bits must be in 2..16")
        if isinstance(self.masks, (str, os.PathLike)):
            self.masks = LiteVARMaskSet.load(self.masks)

    @property
    def resolved_attn_bits(self) -> int | None:
        if self.attn_bits is not None:
            return self.attn_bits
        if self.quant in QUANT_PRESETS:
            return QUANT_PRESETS[self.quant][2]
        return None

    def shares(self, scale: int, block: int) -> bool:
        return (self.share_cfg_attention
                and (self.share_cfg_scales is None or scale in self.share_cfg_scales)
                and (self.share_cfg_blocks is None or block in self.share_cfg_blocks))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
            bias: torch.Tensor | None, mode: str, p_bits: int | None, parity: bool) -> torch.Tensor:
    """Attention with an optional keep-mask (H, Lq, Lk) and additive bias (.., Lq, Lk)."""
    if p_bits is None and mode == "renormalized":
        if mask is not None:
            m = mask[None]
            if bias is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
            bias = bias.to(q.dtype).masked_fill(~m, -torch.inf)
        elif bias is not None:
            bias = bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None and mode == "litevar_float":
        s = s * mask[None]
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None and mode == "renormalized":
        s = s.masked_fill(~mask[None], -torch.inf)
    p = s.softmax(dim=-1)
    if p_bits is not None and k.shape[2] > 1:
        p = fake_quant_probs(p, p_bits, parity)
    if mask is not None and mode == "litevar_quant":
        p = p * mask[None]
    return p @ v


class VARContext:
    """Per-transformer state for stats (found by :func:`diffusers_attn.get_attention_stats`)."""

    adapter = None

    def __init__(self) -> None:
        self.stats = StatsRecorder()
        self.scale_pairs: dict[int, list[float]] = {}

    def begin_generation(self) -> None:
        self.stats.reset()
        self.scale_pairs = {}
        self.stats.info.update(self.static_info)
        self.stats.steps_seen = 0

    static_info: dict[str, Any] = {}


class _VARContextHook(ModelHook):
    _is_stateful = False

    def __init__(self, context: VARContext) -> None:
        super().__init__()
        self.context = context


class LiteVARAttnProcessor:
    """LiteVAR attention for one VAR attention module (block ``block_idx``)."""

    name = "litevar"

    def __init__(self, block_idx: int, config: LiteVARConfig, context: VARContext | None = None) -> None:
        from ..pipelines.var.transformer import VARAttnProcessor

        self.block_idx = block_idx
        self.config = config
        self.context = context
        self._base = VARAttnProcessor()

    def _scale_of(self, attn: Any, Lq: int, Lk: int, scale_idx: int | None) -> int | None:
        ends = self.config.masks.ends if self.config.masks is not None else None
        if ends is None:
            return scale_idx
        if scale_idx is None:
            for s, e in enumerate(ends):
                if e == Lk and (Lq == e - (ends[s - 1] if s else 0)):
                    return s
            raise ValueError(f"LiteVAR: cannot tell the scale of an attention call with {Lq} queries and {Lk} keys")
        if ends[scale_idx] != Lk:
            raise ValueError(
                f"LiteVAR: scale {scale_idx} expects {ends[scale_idx]} keys, got {Lk} (is the KV cache enabled?)"
            )
        return scale_idx

    def __call__(self, attn: Any, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 scale_idx: int | None = None, cfg_batch: bool = False, **kwargs: Any) -> torch.Tensor:
        cfg = self.config
        q, k, v = self._base.qkv(attn, x)
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        bits = cfg.resolved_attn_bits
        if bits is not None:
            q = fake_quant(q, bits, -1, cfg.parity_divisor)
            k = fake_quant(k, bits, -1, cfg.parity_divisor)
            if Lk > 1:
                v = fake_quant(v, bits, 2, cfg.parity_divisor)
        teacher = attn_bias is not None
        mask = None
        si = None
        if cfg.masks is not None:
            if teacher:
                mask = cfg.masks.teacher_mask(Lk, self.block_idx, q.device)
            else:
                si = self._scale_of(attn, Lq, Lk, scale_idx)
                mask = cfg.masks.scale_mask(si, self.block_idx, q.device)
        else:
            si = scale_idx
        share = cfg_batch and not teacher and si is not None and cfg.shares(si, self.block_idx) and B % 2 == 0
        if share:
            h = B // 2
            o = _attend(q[:h], k[:h], torch.cat((v[:h], v[h:]), dim=-1), attn.scale, mask, None, cfg.mask_mode, bits,
                        cfg.parity_divisor)
            o = torch.cat((o[..., :D], o[..., D:]), dim=0)
        elif mask is None and bits is None:
            bias = None if attn_bias is None else attn_bias.to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # the dense processor
        else:
            o = _attend(q, k, v, attn.scale, mask, attn_bias, cfg.mask_mode, bits, cfg.parity_divisor)
        if self.context is not None and not teacher and si is not None:
            self._record(si, B, H, D, Lq, Lk, mask, share)
        return self._base.out(attn, o)

    def _record(self, si: int, B: int, H: int, D: int, Lq: int, Lk: int, mask: torch.Tensor | None,
                share: bool) -> None:
        ctx = self.context
        dense = float(Lq * Lk * H)
        kept = dense * (self.config.masks.kept_share(si, self.block_idx) if mask is not None else 1.0)
        score_batches = B // 2 if share else B  # QK^T + softmax rows actually computed (ASC skips one half)
        patterns = np.zeros((B, H), dtype=np.int64)
        ctx.stats.record(self.block_idx, head_patterns=patterns, computed=kept * score_batches * D,
                         total=dense * B * D, video_computed=kept * B * D, video_total=dense * B * D)
        ctx.stats.kernel_calls["masked_sdpa" if mask is not None else "sdpa"] += 1
        acc = ctx.scale_pairs.setdefault(si, [0.0, 0.0, 0.0])
        acc[0] += kept * B
        acc[1] += dense * B
        acc[2] += kept * score_batches
        pairs = sorted(ctx.scale_pairs.items())
        ctx.stats.info["kept_attention_share_per_scale"] = {s: round(a[0] / a[1], 6) for s, a in pairs}
        ctx.stats.info["computed_score_share_per_scale"] = {s: round(a[2] / a[1], 6) for s, a in pairs}
        ctx.stats.steps_seen = max(ctx.stats.steps_seen, si + 1)


_STATE = "_litevar_state"


def _resolve(pipe_or_model: Any) -> tuple[Any, Any]:
    from ..pipelines.var.transformer import VARTransformer

    tr = getattr(pipe_or_model, "transformer", pipe_or_model)
    if not isinstance(tr, VARTransformer):
        raise TypeError(f"LiteVAR works on a VARPipeline or VARTransformer, got {type(pipe_or_model).__name__}")
    return tr, pipe_or_model if tr is not pipe_or_model else None


def apply_litevar(pipe_or_model: Any, config: LiteVARConfig | None = None) -> VARContext:
    """Install LiteVAR on a :class:`~diffusers_attn.VARPipeline` (or its transformer). Re-applying replaces it.

    Example::

        masks = calibrate_litevar(pipe, class_labels=range(0, 1000, 50))
        apply_litevar(pipe, LiteVARConfig(masks=masks, share_cfg_attention=True, quant="w8a8"))
        images = pipe(class_labels=[207, 360]).images
        print(get_attention_stats(pipe))
        remove_litevar(pipe)
    """
    from ..context import CONTEXT_HOOK_NAME

    config = config if config is not None else LiteVARConfig()
    if not isinstance(config, LiteVARConfig):
        raise TypeError(f"config must be a LiteVARConfig, got {type(config).__name__}")
    tr, _ = _resolve(pipe_or_model)
    if config.masks is not None:
        config.masks.check_model(tr)
    if config.quant == "int8" and tr.device.type != "cuda":
        apply_int8(tr, config.quant_exclude)  # raises the clear CPU error before anything is installed
    if getattr(tr, _STATE, None) is not None:
        remove_litevar(tr)
    context = VARContext()
    quantized: list[str] = []
    kept16: list[str] = []
    if config.quant in QUANT_PRESETS:
        wb, ab, _ = QUANT_PRESETS[config.quant]
        quantized, kept16 = apply_fake_quant(tr, wb, ab, config.quant_exclude, config.parity_divisor)
    elif config.quant == "int8":
        quantized, kept16 = apply_int8(tr, config.quant_exclude)
    originals = dict(tr.attn_processors)
    procs = {key: LiteVARAttnProcessor(int(key.split(".")[1]), config, context) for key in originals}
    tr.set_attn_processor(procs)
    context.static_info = {
        "quant": config.quant, "attn_bits": config.resolved_attn_bits, "quantized_layers": quantized,
        "kept_16bit_layers": kept16, "mask_mode": config.mask_mode if config.masks is not None else None,
        "mask_backend": "masked_sdpa (dense compute; kept share = what a sparse kernel would need)",
        "share_cfg_attention": config.share_cfg_attention,
        "mask_summary": config.masks.summary() if config.masks is not None else None,
    }
    context.begin_generation()
    context.stats.method = "litevar"
    context.stats.layers_per_forward = 0  # VAR runs blocks outside forward(); skipped-call accounting is off
    registry = HookRegistry.check_if_exists_or_initialize(tr)
    if registry.get_hook(CONTEXT_HOOK_NAME) is not None:
        registry.remove_hook(CONTEXT_HOOK_NAME, recurse=False)
    registry.register_hook(_VARContextHook(context), CONTEXT_HOOK_NAME)
    setattr(tr, _STATE, (originals, config, context))
    logger.info("diffusers-attn: LiteVAR installed on %d VAR blocks (%d linears quantized: %s)", len(procs),
                len(quantized), config.quant)
    return context


def remove_litevar(pipe_or_model: Any) -> bool:
    """Restore the dense processors and un-wrap fake-quant linears. Returns False if LiteVAR was not installed."""
    from ..context import CONTEXT_HOOK_NAME

    tr, _ = _resolve(pipe_or_model)
    state = getattr(tr, _STATE, None)
    if state is None:
        return False
    originals, _, _ = state
    tr.set_attn_processor(dict(originals))
    if remove_fake_quant(tr):
        logger.warning("diffusers-attn: the int8 linears stay int8 (the conversion is one-way); reload the model")
    registry = getattr(tr, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(CONTEXT_HOOK_NAME) is not None:
        registry.remove_hook(CONTEXT_HOOK_NAME, recurse=False)
    delattr(tr, _STATE)
    return True


def begin_var_generation(transformer: Any) -> None:
    """Called by ``VARPipeline`` at the start of a generation: resets LiteVAR stats."""
    state = getattr(transformer, _STATE, None)
    if state is not None:
        state[2].begin_generation()
        state[2].stats.method = "litevar"


# ---------------- calibration ----------------

class _CalibrationProcessor:
    """Dense attention (exact dense output) that records per-segment mass histograms at maskable scales."""

    def __init__(self, block_idx: int, rec: "_Recorder") -> None:
        from ..pipelines.var.transformer import VARAttnProcessor

        self.block_idx, self.rec = block_idx, rec
        self._base = VARAttnProcessor()

    def __call__(self, attn: Any, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 scale_idx: int | None = None, cfg_batch: bool = False, **kwargs: Any) -> torch.Tensor:
        q, k, v = self._base.qkv(attn, x)
        if attn_bias is None and scale_idx in self.rec.maskable:
            p = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)
            self.rec.add(scale_idx, self.block_idx, p)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_bias is None else attn_bias.to(q.dtype),
                                           scale=attn.scale)
        return self._base.out(attn, o)


class _Recorder:
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
    """Widths (H, nseg) for one (scale, block) from the recorded statistics (spec B.2 rules 2-4).

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


@torch.no_grad()
def calibrate_litevar(
    pipe: Any,
    class_labels: Iterable[int] | None = None,
    *,
    threshold: float = 0.95,
    prob_floor: float = 0.003,
    drop_table: str | Mapping[int, Sequence[float]] | None = "litevar",
    candidate_widths: str | Sequence[int] = "all",  # "all", "litevar" (d16/d30 lists) or a list
    maskable: Mapping[int, Sequence[int]] | None = None,
    batch_size: int = 8,
    guidance_scale: float = 4.0,
    top_k: int = 900,
    top_p: float = 0.95,
    seed: int = 0,
) -> LiteVARMaskSet:
    """Calibrate MDWA masks offline on full-attention maps of ``pipe`` sampling ``class_labels``.

    Per batch (CFG batch of 2 x ``batch_size``), scale, block, head and maskable segment: probabilities below
    ``prob_floor`` are zeroed; the segment is DROPped when its share of the head's mass is below ``drop_table``
    (``"litevar"``: the release's table, 10-scale models only; None: never drop); otherwise it gets the smallest
    candidate width whose band keeps ``threshold`` of the segment's mass (``candidate_widths="all"``: 1 ... n_seg;
    ``"litevar"``: the release's hand-picked d16/d30 lists), FULL if none does. Batches merge by **union** (max
    width; our documented choice, the release's merge rule is not published). ``class_labels`` default: LiteVAR's calibration set (160 classes).
    """
    tr, owner = _resolve(pipe)
    if owner is None:
        raise TypeError("calibrate_litevar samples images: pass the VARPipeline, not its transformer")
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    labels = list(class_labels) if class_labels is not None else litevar_calibration_labels()
    if not labels:
        raise ValueError("class_labels is empty")
    patch_nums = tuple(tr.patch_nums)
    layout = dict(maskable) if maskable is not None else default_maskable(patch_nums)
    if drop_table == "litevar":
        if patch_nums != DEFAULT_PATCH_NUMS or layout != default_maskable(patch_nums):
            raise ValueError(
                f"drop_table='litevar' is defined for patch_nums {DEFAULT_PATCH_NUMS} with LiteVAR's segment layout; "
                f"this model has {patch_nums}: pass drop_table=None or a dict {{scale: thresholds per segment}}"
            )
        table: Mapping[int, Sequence[float]] | None = LITEVAR_DROP_TABLE
    elif drop_table is None or isinstance(drop_table, Mapping):
        table = drop_table
    else:
        raise ValueError(f"drop_table {drop_table!r}: use 'litevar', None or a dict")
    if table is not None:
        for k_, segs in layout.items():
            if k_ in table and len(table[k_]) != len(segs):
                raise ValueError(f"drop_table[{k_}] has {len(table[k_])} thresholds for {len(segs)} segments")
    cand_table: dict[int, Any] | None = None
    if candidate_widths == "all":
        cands = None
    elif candidate_widths == "litevar":
        if (tr.num_heads not in LITEVAR_CANDIDATE_WIDTHS or patch_nums != DEFAULT_PATCH_NUMS
                or layout != default_maskable(patch_nums)):
            raise ValueError(
                "candidate_widths='litevar' exists only for the release's 16- and 30-head models (d16, d30) with "
                f"patch_nums {DEFAULT_PATCH_NUMS}; this model has {tr.num_heads} heads: use 'all' or a list of ints"
            )
        cands = None
        cand_table = LITEVAR_CANDIDATE_WIDTHS[tr.num_heads]
    elif isinstance(candidate_widths, str):
        raise ValueError(f"candidate_widths {candidate_widths!r}: use 'all', 'litevar' or a list of ints")
    else:
        cands = [int(c) for c in candidate_widths]
    if getattr(tr, _STATE, None) is not None:
        raise RuntimeError("calibrate on the dense model: call remove_litevar(pipe) first")
    rec = _Recorder(patch_nums, layout, prob_floor)
    originals = dict(tr.attn_processors)
    tr.set_attn_processor({key: _CalibrationProcessor(int(key.split(".")[1]), rec) for key in originals})
    merged: LiteVARMaskSet | None = None
    depth, H = len(tr.blocks), tr.num_heads
    try:
        for start in range(0, len(labels), batch_size):
            rec.reset()
            gen = torch.Generator(tr.device).manual_seed(seed)
            pipe(class_labels=labels[start : start + batch_size], guidance_scale=guidance_scale, top_k=top_k,
                 top_p=top_p, generator=gen, output_type="latent")
            widths = {}
            for k_, segs in layout.items():
                w = torch.zeros(depth, H, len(segs), dtype=torch.int16)
                for b in range(depth):
                    hist, seg_mass, total = rec.data[(k_, b)]
                    w[b] = choose_widths(hist, seg_mass, total, k_, segs, patch_nums, threshold,
                                         None if table is None else table.get(k_),
                                         drop_table == "litevar" and k_ == len(patch_nums) - 1,
                                         cand_table[k_] if cand_table is not None else cands)
                widths[k_] = w
            ms = LiteVARMaskSet(patch_nums, depth, H, widths, layout)
            merged = ms if merged is None else merged.union(ms)
    finally:
        tr.set_attn_processor(dict(originals))
    merged.metadata = {
        "threshold": threshold, "prob_floor": prob_floor,
        "drop_table": (drop_table if isinstance(drop_table, str) or drop_table is None
                       else {str(a): list(b) for a, b in drop_table.items()}),
        "candidate_widths": candidate_widths if isinstance(candidate_widths, str) else list(cands),
        "class_labels": labels, "batch_size": batch_size, "seed": seed, "guidance_scale": guidance_scale,
        "top_k": top_k, "top_p": top_p, "merge": "union", "version": MASK_FORMAT_VERSION,
    }
    return merged
