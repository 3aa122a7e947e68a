"""Model adapters: how each supported transformer family computes q/k/v, where text sits, and its latent grid."""

from __future__ import annotations

import torch

from .base import AcceleratedAttnProcessor, ModelAdapter
from .cogvideox import CogVideoXAdapter, CogVideoXAttnProcessor
from .hunyuan_video import HunyuanVideoAdapter, HunyuanVideoAttnProcessor
from .opensora import OpenSoraAdapter, OpenSoraAttnProcessor

_ADAPTERS: list[ModelAdapter] = [CogVideoXAdapter(), HunyuanVideoAdapter(), OpenSoraAdapter()]


def register_adapter(adapter: ModelAdapter) -> None:
    """Add support for another transformer class (e.g. a model this package ships)."""
    if not any(type(a) is type(adapter) for a in _ADAPTERS):
        _ADAPTERS.append(adapter)


def supported_transformers() -> list[str]:
    return [a.transformer_class_name for a in _ADAPTERS]


def get_adapter(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``transformer``, or a ValueError naming the supported classes."""
    for adapter in _ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    raise ValueError(
        f"diffusers-attn: unsupported transformer class {type(transformer).__name__}; supported: "
        f"{', '.join(supported_transformers())}"
    )


__all__ = [
    "AcceleratedAttnProcessor",
    "ModelAdapter",
    "CogVideoXAdapter",
    "CogVideoXAttnProcessor",
    "HunyuanVideoAdapter",
    "HunyuanVideoAttnProcessor",
    "OpenSoraAdapter",
    "OpenSoraAttnProcessor",
    "get_adapter",
    "register_adapter",
    "supported_transformers",
]
