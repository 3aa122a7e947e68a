"""LiteVAR settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from .masks import LiteVARMaskSet
from .quant import QUANT_PRESETS, REAL_QUANT

MASK_MODES = ("renormalized", "litevar_quant", "litevar_float")


@dataclass
class LiteVARConfig:
    """LiteVAR settings.

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

