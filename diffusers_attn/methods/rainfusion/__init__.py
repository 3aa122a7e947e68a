"""RainFusion: training-free sparse attention for 3D video DiTs (per-head Spatial / Temporal / Textural patterns
chosen online by the ARM recognizer; text and the first latent frame dense).

``config`` (settings, sparsity -> windows) · ``plan`` (shape-only block lists) · ``recognition`` (ARM) ·
``execution`` (kernels per decision) · ``method`` (the per-call control flow).
"""

from .config import (
    DENSE,
    PATTERN_NAMES,
    SPATIAL,
    TEMPORAL,
    TEXTURAL,
    PatternParams,
    RainFusionConfig,
    pattern_params,
)
from .method import Decision, RainFusionMethod
from .plan import RainFusionPlan
from .recognition import arm_recalls, choose_patterns

__all__ = [
    "DENSE",
    "PATTERN_NAMES",
    "SPATIAL",
    "TEMPORAL",
    "TEXTURAL",
    "Decision",
    "PatternParams",
    "RainFusionConfig",
    "RainFusionMethod",
    "RainFusionPlan",
    "arm_recalls",
    "choose_patterns",
    "pattern_params",
]
