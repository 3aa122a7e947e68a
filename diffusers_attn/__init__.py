"""diffusers-attn: faster attention for Hugging Face diffusers video and image pipelines.

Public API (diffusers style: ``XConfig`` + ``apply_x``)::

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
"""

from .adapters import CogVideoXAttnProcessor, HunyuanVideoAttnProcessor, supported_transformers
from .context import AttentionContext, attach_attention_context, detach_attention_context, get_attention_context
from .install import get_attention_stats, remove_attention_acceleration, reset_attention_stats
from .layout import TokenLayout
from .processors.rainfusion import RainFusionConfig, RainFusionMethod, apply_rainfusion
from .stats import AttentionStats
from .pipelines.var import VARPipeline, VARTransformer, VQVAE
from .processors.litevar import LiteVARConfig, LiteVARMaskSet, apply_litevar, calibrate_litevar, remove_litevar

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
    "AttentionStats",
    "CogVideoXAttnProcessor",
    "HunyuanVideoAttnProcessor",
    "RainFusionConfig",
    "RainFusionMethod",
    "TokenLayout",
    "apply_rainfusion",
    "attach_attention_context",
    "detach_attention_context",
    "get_attention_context",
    "get_attention_stats",
    "remove_attention_acceleration",
    "reset_attention_stats",
    "supported_transformers",
    "VARPipeline",
    "VARTransformer",
    "VQVAE",
    "LiteVARConfig",
    "LiteVARMaskSet",
    "apply_litevar",
    "calibrate_litevar",
    "remove_litevar",
]
