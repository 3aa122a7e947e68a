"""VAR (``VARTransformer``, this package): next-scale prediction with a KV cache across scales.

Each block's attention computes fused q/k/v with the model's (q, 0, v) bias and l2-normalised q/k exactly as
:class:`~diffusers_attn.pipelines.var.transformer.VARAttnProcessor`; the layout of a call is a
:class:`~diffusers_attn.layout.ScaleLayout` (which scale, CFG batch, the teacher-forcing bias). A generation is not
a sequence of timestep forwards (the pipeline runs the blocks directly), so the context hook records nothing and
the first block's call at scale 0 starts a new generation in the stats.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..layout import ScaleLayout
from ..pipelines.var.transformer import VARAttnProcessor, VARTransformer
from .base import ModelAdapter
from .processor import AcceleratedAttnProcessor


class VARAcceleratedAttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for :class:`VARAttnProcessor` that routes attention to a method."""

    model_name = "VAR"
    _base = VARAttnProcessor()

    def __call__(self, attn: Any, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 scale_idx: int | None = None, cfg_batch: bool = False, **kwargs: Any) -> torch.Tensor:
        ctx = self._require_context()
        q, k, v = self._base.qkv(attn, x)
        layout = ScaleLayout(scale_idx, cfg_batch, attn_bias)
        if scale_idx == 0 and attn_bias is None and self.layer_index == 0:
            ctx.begin_generation()

        def dense() -> torch.Tensor:
            bias = None if attn_bias is None else attn_bias.to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)

        o = self.run_method(q, k, v, layout=layout, key_padding_mask=None, dense_fn=dense, scale=attn.scale)
        return self._base.out(attn, o)


class VARAdapter(ModelAdapter):
    name = "var"
    transformer_class_name = "VARTransformer"
    layout_kind = "scales"
    block_prefixes = ("blocks.",)
    processor_cls = VARAcceleratedAttnProcessor

    def transformer_class(self) -> type:
        return VARTransformer

    def native_processor_classes(self) -> tuple[type, ...]:
        return (VARAttnProcessor,)

    def forward_inputs(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> None:
        return None  # generations are counted by the processors (scale 0), not by forwards

    def layers_per_forward(self, keys: list[str]) -> int:
        return 0  # the pipeline runs the blocks outside forward(): no skipped-call accounting


class VARProbeAttnProcessor:
    """Dense VAR attention (the stock output, exactly) that hands the fp32 softmax probabilities of the inference
    calls at ``scales`` to ``on_probs(scale, block, probs)``: what offline mask calibration records."""

    def __init__(self, block_idx: int, scales: Any, on_probs: Any) -> None:
        self.block_idx, self.scales, self.on_probs = block_idx, scales, on_probs
        self._base = VARAttnProcessor()

    def __call__(self, attn: Any, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 scale_idx: int | None = None, cfg_batch: bool = False, **kwargs: Any) -> torch.Tensor:
        q, k, v = self._base.qkv(attn, x)
        if attn_bias is None and scale_idx in self.scales:
            p = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)
            self.on_probs(scale_idx, self.block_idx, p)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_bias is None else attn_bias.to(q.dtype),
                                           scale=attn.scale)
        return self._base.out(attn, o)
