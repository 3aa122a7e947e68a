"""The public install API: one ``apply_*`` per method, one :func:`apply` that dispatches on the config type (as
diffusers' ``enable_cache``), one removal and one stats call for whatever is installed."""

from __future__ import annotations

from typing import Any

from ..context import AttentionContext
from ..install import get_attention_stats, remove_attention_acceleration, reset_attention_stats
from ..methods.feat import FEATConfig
from ..methods.litevar import LiteVARConfig
from ..methods.rainfusion import RainFusionConfig
from .feat import apply_feat, get_feat_method
from .feat_training import (
    collect_transformer_inputs,
    distill_feat,
    load_feat_adapter,
    remove_feat_lora,
    save_feat_adapter,
)
from .litevar import apply_litevar, calibrate_litevar, remove_litevar
from .rainfusion import apply_rainfusion

_APPLY = {RainFusionConfig: apply_rainfusion, FEATConfig: apply_feat, LiteVARConfig: apply_litevar}


def apply(pipe_or_model: Any, config: RainFusionConfig | FEATConfig | LiteVARConfig) -> AttentionContext:
    """Install the method ``config`` configures (``RainFusionConfig``, ``FEATConfig`` or ``LiteVARConfig``)."""
    fn = _APPLY.get(type(config))
    if fn is None:
        raise TypeError(
            f"diffusers-attn: apply() takes one of {', '.join(c.__name__ for c in _APPLY)}, got {type(config).__name__}"
        )
    return fn(pipe_or_model, config)


__all__ = [
    "apply",
    "apply_feat",
    "apply_litevar",
    "apply_rainfusion",
    "calibrate_litevar",
    "collect_transformer_inputs",
    "distill_feat",
    "get_attention_stats",
    "get_feat_method",
    "load_feat_adapter",
    "remove_attention_acceleration",
    "remove_feat_lora",
    "remove_litevar",
    "reset_attention_stats",
    "save_feat_adapter",
]
