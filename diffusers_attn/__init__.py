"""diffusers-attn: faster attention for Hugging Face diffusers video and image pipelines.

Public API (diffusers style: ``XConfig`` + ``apply_x``)::

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration

Layers, each importing only the ones below it: ``kernels`` ← ``methods`` ← ``adapters`` ← install/API
(``context``, ``install``, ``parallel``, ``api``). ``pipelines`` (models diffusers lacks) sit beside.
"""

from .adapters import CogVideoXAttnProcessor, HunyuanVideoAttnProcessor, supported_transformers
from .api import (
    apply,
    apply_feat,
    apply_litevar,
    apply_rainfusion,
    calibrate_litevar,
    distill_feat,
    remove_litevar,
)
from .api.feat import FEATAttnProcessor
from .context import AttentionContext, attach_attention_context, detach_attention_context, get_attention_context
from .install import get_attention_stats, remove_attention_acceleration, reset_attention_stats
from .layout import ScaleLayout, TokenLayout
from .methods.feat import FEATConfig
from .methods.litevar import LiteVARConfig, LiteVARMaskSet
from .methods.rainfusion import RainFusionConfig, RainFusionMethod
from .pipelines.feat import FEATTransformer3DModel
from .pipelines.var import VQVAE, VARPipeline, VARTransformer
from .stats import AttentionStats

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
    "ScaleLayout",
    "TokenLayout",
    "apply",
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
