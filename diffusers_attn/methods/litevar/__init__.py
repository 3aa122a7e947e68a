"""LiteVAR for VAR: windowed diagonal attention masks (MDWA), CFG attention sharing (ASC) and post-training
quantization (Xie et al., arXiv 2411.17178).

``masks`` (mask sets) · ``tables`` (the release's constants) · ``config`` · ``quant`` · ``calibration``
(statistics and width choice) · ``method`` (the per-call attention).
"""

from .calibration import choose_widths, segment_statistics
from .config import MASK_MODES, LiteVARConfig
from .masks import MASK_FORMAT_VERSION, LiteVARMaskSet, band_mask, default_maskable, min_width
from .method import PATTERN_NAMES, LiteVARMethod
from .tables import (
    DEFAULT_PATCH_NUMS,
    LITEVAR_CALIBRATION_STARTS,
    LITEVAR_CANDIDATE_WIDTHS,
    LITEVAR_DROP_TABLE,
    litevar_calibration_labels,
)

__all__ = [
    "DEFAULT_PATCH_NUMS",
    "LITEVAR_CALIBRATION_STARTS",
    "LITEVAR_CANDIDATE_WIDTHS",
    "LITEVAR_DROP_TABLE",
    "MASK_FORMAT_VERSION",
    "MASK_MODES",
    "PATTERN_NAMES",
    "LiteVARConfig",
    "LiteVARMaskSet",
    "LiteVARMethod",
    "band_mask",
    "choose_widths",
    "default_maskable",
    "litevar_calibration_labels",
    "min_width",
    "segment_statistics",
]
