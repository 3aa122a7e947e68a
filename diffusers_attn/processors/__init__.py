"""Attention methods (what to compute): one file per method, model-agnostic."""

from .base import AttentionMethod
from .rainfusion import (
    PatternParams,
    RainFusionConfig,
    RainFusionMethod,
    RainFusionPlan,
    apply_rainfusion,
    arm_recalls,
    choose_patterns,
    pattern_params,
)

__all__ = [
    "AttentionMethod",
    "PatternParams",
    "RainFusionConfig",
    "RainFusionMethod",
    "RainFusionPlan",
    "apply_rainfusion",
    "arm_recalls",
    "choose_patterns",
    "pattern_params",
]
