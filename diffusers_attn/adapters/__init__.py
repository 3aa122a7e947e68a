"""Model adapters: how each supported transformer family computes q/k/v, where text sits, and its latent grid.

One file per family. To add one, write ``<family>.py`` with a processor (subclass of
:class:`~diffusers_attn.adapters.processor.AcceleratedAttnProcessor`) and a :class:`ModelAdapter`, then list the
adapter in ``_ADAPTERS`` below (or call :func:`register_adapter` from outside the package).
"""

from __future__ import annotations

import torch

from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter, CogVideoXAttnProcessor
from .hunyuan_video import HunyuanVideoAdapter, HunyuanVideoAttnProcessor
from .hunyuan_video15 import HunyuanVideo15Adapter, HunyuanVideo15AttnProcessor
from .opensora import OpenSoraAdapter, OpenSoraAttnProcessor
from .processor import AcceleratedAttnProcessor, run_method
from .var import VARAcceleratedAttnProcessor, VARAdapter
from .wan import WanAdapter, WanAttnProcessor, WanVACEAdapter

_ADAPTERS: list[ModelAdapter] = [CogVideoXAdapter(), HunyuanVideoAdapter(), OpenSoraAdapter(), VARAdapter()]
_ADAPTERS += [WanAdapter(), WanVACEAdapter()]
_ADAPTERS += [HunyuanVideo15Adapter()]


def register_adapter(adapter: ModelAdapter) -> None:
    """Add support for another transformer class (e.g. a model this package ships)."""
    if not any(type(a) is type(adapter) for a in _ADAPTERS):
        _ADAPTERS.append(adapter)


def supported_transformers(layout_kind: str | None = None) -> list[str]:
    """Class names of the supported transformers (those handing methods ``layout_kind`` layouts, if given)."""
    return [a.transformer_class_name for a in _ADAPTERS if layout_kind in (None, a.layout_kind)]


def get_adapter(transformer: torch.nn.Module, layout_kind: str | None = None) -> ModelAdapter:
    """The adapter for ``transformer``, or a ValueError naming the supported classes."""
    for adapter in _ADAPTERS:
        if adapter.matches(transformer) and layout_kind in (None, adapter.layout_kind):
            return adapter
    raise ValueError(
        f"diffusers-attn: unsupported transformer class {type(transformer).__name__}; supported: "
        f"{', '.join(supported_transformers(layout_kind))}"
    )


__all__ = [
    "AcceleratedAttnProcessor",
    "ModelAdapter",
    "CogVideoXAdapter",
    "CogVideoXAttnProcessor",
    "HunyuanVideoAdapter",
    "HunyuanVideoAttnProcessor",
    "HunyuanVideo15Adapter",
    "HunyuanVideo15AttnProcessor",
    "OpenSoraAdapter",
    "OpenSoraAttnProcessor",
    "VARAdapter",
    "VARAcceleratedAttnProcessor",
    "WanAdapter",
    "WanAttnProcessor",
    "WanVACEAdapter",
    "get_adapter",
    "register_adapter",
    "run_method",
    "supported_transformers",
]
