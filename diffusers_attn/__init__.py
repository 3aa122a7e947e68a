"""diffusers-attn: faster attention for Hugging Face diffusers video and image pipelines.

Public API (diffusers style: ``XConfig`` + ``apply_x``)::

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration

Layers, each importing only the ones below it: ``kernels`` ← ``methods`` ← ``adapters`` ← install/API
(``context``, ``install``, ``parallel``, ``api``). ``pipelines`` (models diffusers lacks) sit beside.

Names are imported on first use: ``import diffusers_attn`` (and ``diffusers-attn --help``, or the shape-only
``diffusers-attn plan``) must not pay for torch, diffusers and the pipelines before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "CogVideoXAttnProcessor": ".adapters",
    "HunyuanVideoAttnProcessor": ".adapters",
    "supported_transformers": ".adapters",
    "apply": ".api",
    "apply_feat": ".api",
    "apply_litevar": ".api",
    "apply_rainfusion": ".api",
    "calibrate_litevar": ".api",
    "distill_feat": ".api",
    "remove_litevar": ".api",
    "FEATAttnProcessor": ".api.feat",
    "AttentionContext": ".context",
    "attach_attention_context": ".context",
    "detach_attention_context": ".context",
    "get_attention_context": ".context",
    "get_attention_stats": ".install",
    "remove_attention_acceleration": ".install",
    "reset_attention_stats": ".install",
    "ScaleLayout": ".layout",
    "TokenLayout": ".layout",
    "FEATConfig": ".methods.feat",
    "LiteVARConfig": ".methods.litevar",
    "LiteVARMaskSet": ".methods.litevar",
    "RainFusionConfig": ".methods.rainfusion",
    "RainFusionMethod": ".methods.rainfusion",
    "FEATTransformer3DModel": ".pipelines.feat",
    "VQVAE": ".pipelines.var",
    "VARPipeline": ".pipelines.var",
    "VARTransformer": ".pipelines.var",
    "OpenSoraPipeline": ".pipelines.opensora",
    "OpenSoraTransformer3DModel": ".pipelines.opensora",
    "AttentionStats": ".stats",
}

__all__ = [
    "VQVAE",
    "AttentionContext",
    "AttentionStats",
    "CogVideoXAttnProcessor",
    "FEATAttnProcessor",
    "FEATConfig",
    "FEATTransformer3DModel",
    "HunyuanVideoAttnProcessor",
    "LiteVARConfig",
    "LiteVARMaskSet",
    "OpenSoraPipeline",
    "OpenSoraTransformer3DModel",
    "RainFusionConfig",
    "RainFusionMethod",
    "ScaleLayout",
    "TokenLayout",
    "VARPipeline",
    "VARTransformer",
    "apply",
    "apply_feat",
    "apply_litevar",
    "apply_rainfusion",
    "attach_attention_context",
    "calibrate_litevar",
    "detach_attention_context",
    "distill_feat",
    "get_attention_context",
    "get_attention_stats",
    "remove_attention_acceleration",
    "remove_litevar",
    "reset_attention_stats",
    "supported_transformers",
]

if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
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
    from .pipelines.opensora import OpenSoraPipeline, OpenSoraTransformer3DModel
    from .pipelines.var import VQVAE, VARPipeline, VARTransformer
    from .stats import AttentionStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
