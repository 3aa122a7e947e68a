"""LiteVAR for VAR (Xie et al., arXiv 2411.17178): windowed diagonal attention masks (MDWA), CFG attention sharing
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
* **Quantization.** See :mod:`diffusers_attn.methods.litevar.quant`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...layout import ScaleLayout
from ..base import CallInfo, MethodRecord
from .config import LiteVARConfig
from .quant import QUANT_PRESETS, apply_fake_quant, apply_int8, fake_quant, fake_quant_probs, remove_fake_quant

logger = logging.getLogger(__name__)

#: per-head pattern names in the stats
PATTERN_NAMES = ("full", "windowed", "cfg_shared", "windowed+cfg_shared")


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



class LiteVARMethod:
    """LiteVAR attention for every block of a VAR transformer (one instance per transformer)."""

    name = "litevar"
    layouts = ("scales",)

    def __init__(self, config: LiteVARConfig | None = None) -> None:
        self.config = config if config is not None else LiteVARConfig()

    # ------------------------------------------------------------------ install-time model changes
    def on_install(self, transformer: torch.nn.Module) -> dict[str, Any]:
        """Check the masks against the model and quantize its linears; returns what the stats keep as info."""
        cfg = self.config
        if cfg.masks is not None:
            cfg.masks.check_model(transformer)
        quantized: list[str] = []
        kept16: list[str] = []
        if cfg.quant in QUANT_PRESETS:
            wb, ab, _ = QUANT_PRESETS[cfg.quant]
            quantized, kept16 = apply_fake_quant(transformer, wb, ab, cfg.quant_exclude, cfg.parity_divisor)
        elif cfg.quant == "int8":
            quantized, kept16 = apply_int8(transformer, cfg.quant_exclude)
        logger.info("diffusers-attn: LiteVAR: %d linears quantized (%s)", len(quantized), cfg.quant)
        return {
            "quant": cfg.quant, "attn_bits": cfg.resolved_attn_bits, "quantized_layers": quantized,
            "kept_16bit_layers": kept16, "mask_mode": cfg.mask_mode if cfg.masks is not None else None,
            "mask_backend": "masked_sdpa (dense compute; kept share = what a sparse kernel would need)",
            "share_cfg_attention": cfg.share_cfg_attention,
            "mask_summary": cfg.masks.summary() if cfg.masks is not None else None,
        }

    def on_remove(self, transformer: torch.nn.Module) -> None:
        if remove_fake_quant(transformer):
            logger.warning("diffusers-attn: the int8 linears stay int8 (the conversion is one-way); reload the model")

    # ------------------------------------------------------------------ the call
    def _scale_of(self, layout: ScaleLayout, Lq: int, Lk: int) -> int | None:
        ends = self.config.masks.ends if self.config.masks is not None else None
        scale_idx = layout.scale
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: ScaleLayout,
               key_padding_mask: torch.Tensor | None, scale: float | None, call: CallInfo,
               dense_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, MethodRecord | None]:
        cfg, block = self.config, call.layer_index
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        bits = cfg.resolved_attn_bits
        if bits is not None:
            q = fake_quant(q, bits, -1, cfg.parity_divisor)
            k = fake_quant(k, bits, -1, cfg.parity_divisor)
            if Lk > 1:
                v = fake_quant(v, bits, 2, cfg.parity_divisor)
        teacher = layout.teacher_forced
        mask = None
        si = layout.scale
        if cfg.masks is not None:
            if teacher:
                mask = cfg.masks.teacher_mask(Lk, block, q.device)
            else:
                si = self._scale_of(layout, Lq, Lk)
                mask = cfg.masks.scale_mask(si, block, q.device)
        share = layout.cfg_batch and not teacher and si is not None and cfg.shares(si, block) and B % 2 == 0
        if share:
            h = B // 2
            o = _attend(q[:h], k[:h], torch.cat((v[:h], v[h:]), dim=-1), scale, mask, None, cfg.mask_mode, bits,
                        cfg.parity_divisor)
            o = torch.cat((o[..., :D], o[..., D:]), dim=0)
        elif mask is None and bits is None:
            o = dense_fn()  # the stock processor's call
        else:
            o = _attend(q, k, v, scale, mask, layout.attn_bias, cfg.mask_mode, bits, cfg.parity_divisor)
        if teacher or si is None:
            return o, None  # teacher-forced calls are not a generation: not in the stats
        return o, self._record(si, block, B, H, D, Lq, Lk, mask, share)

    def _record(self, si: int, block: int, B: int, H: int, D: int, Lq: int, Lk: int, mask: torch.Tensor | None,
                share: bool) -> MethodRecord:
        masks = self.config.masks
        dense = float(Lq * Lk * H)
        kept = dense * (masks.kept_share(si, block) if mask is not None else 1.0)
        score_batches = B // 2 if share else B  # QK^T + softmax rows actually computed (ASC skips one half)
        windowed = np.zeros(H, dtype=bool)
        if mask is not None and si in masks.widths:
            windowed = (masks.seg_kind(si)[block] != 2).any(-1).numpy()  # a dropped or banded segment
        per_head = windowed.astype(np.int64) + (2 if share else 0)  # index into PATTERN_NAMES
        return MethodRecord(
            head_patterns=np.broadcast_to(per_head, (B, H)).copy(), computed=kept * score_batches * D,
            total=dense * B * D, video_computed=kept * B * D, video_total=dense * B * D,
            pattern_names=PATTERN_NAMES, kernel="masked_sdpa" if mask is not None else "sdpa", group=si,
            group_name="scale",
        )
