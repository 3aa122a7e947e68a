"""Deprecated: the methods moved to :mod:`diffusers_attn.methods` (one subpackage per method) and their install
functions to :mod:`diffusers_attn.api`. These modules re-export the old names for one release."""

import warnings

from ..api import apply_rainfusion
from ..methods.base import AttentionMethod
from ..methods.rainfusion import (
    PatternParams,
    RainFusionConfig,
    RainFusionMethod,
    RainFusionPlan,
    arm_recalls,
    choose_patterns,
    pattern_params,
)

warnings.warn(
    "diffusers_attn.processors is deprecated: import from diffusers_attn (public API), diffusers_attn.methods or "
    "diffusers_attn.api", DeprecationWarning, stacklevel=2,
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
