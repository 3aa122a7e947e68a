"""diffusers-attn: faster attention for Hugging Face diffusers video and image pipelines.

Public API (diffusers style: ``XConfig`` + ``apply_x``)::

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
"""

from .adapters import CogVideoXAttnProcessor, HunyuanVideoAttnProcessor, supported_transformers
from .context import AttentionContext, attach_attention_context, detach_attention_context, get_attention_context
from .install import get_attention_stats, remove_attention_acceleration, reset_attention_stats
from .layout import TokenLayout
from .processors.rainfusion import RainFusionConfig, RainFusionMethod, apply_rainfusion
from .processors.feat import FEATAttnProcessor, FEATConfig, apply_feat, distill_feat
from .pipelines.feat import FEATTransformer3DModel
from .stats import AttentionStats
from .pipelines.var import VARPipeline, VARTransformer, VQVAE
from .processors.litevar import LiteVARConfig, LiteVARMaskSet, apply_litevar, calibrate_litevar, remove_litevar

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
    "AttentionStats",
    "FEATAttnProcessor",
    "FEATConfig",
    "FEATTransformer3DModel",
    "CogVideoXAttnProcessor",
    "HunyuanVideoAttnProcessor",
    "RainFusionConfig",
    "RainFusionMethod",
    "TokenLayout",
    "apply_feat",
    "apply_rainfusion",
    "attach_attention_context",
    "detach_attention_context",
    "distill_feat",
    "get_attention_context",
    "get_attention_stats",
    "remove_attention_acceleration",
    "reset_attention_stats",
    "supported_transformers",
    "OpenSoraPipeline",
    "OpenSoraTransformer3DModel",
    "VARPipeline",
    "VARTransformer",
    "VQVAE",
    "LiteVARConfig",
    "LiteVARMaskSet",
    "apply_litevar",
    "calibrate_litevar",
    "remove_litevar",
]

_LAZY = {"OpenSoraPipeline", "OpenSoraTransformer3DModel"}  # imported on first use: the pipeline stack is slow to load


def __getattr__(name: str):
    if name in _LAZY:
        from .pipelines import opensora

        return getattr(opensora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
