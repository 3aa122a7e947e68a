"""Installing and removing accelerated attention on a pipeline or transformer: the one place for that logic.

Installation builds the ``set_attn_processor`` dict from ``transformer.attn_processors`` (replacing only the
model's attention layers, never e.g. HunyuanVideo's text refiner), keeps the original dict for restoring, and
registers the context hook. Nothing is patched globally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import get_adapter
from .context import AttentionContext, attach_attention_context, detach_attention_context
from .processors.base import AttentionMethod
from .stats import AttentionStats

logger = logging.getLogger(__name__)

_STATE_ATTR = "_diffusers_attn_state"


@dataclass
class InstalledState:
    originals: dict[str, Any]
    method: AttentionMethod
    context: AttentionContext
    keys: list[str]


def resolve_transformer(pipe_or_model: Any) -> tuple[torch.nn.Module, Any]:
    """``(transformer, pipeline or None)`` from a diffusers pipeline or a transformer model."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model, None
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, pipe_or_model
    raise TypeError(
        f"expected a diffusers pipeline with a .transformer or a transformer model, got {type(pipe_or_model).__name__}"
    )


def install_method(
    pipe_or_model: Any,
    method: AttentionMethod,
    *,
    num_inference_steps: int | None = None,
    processor_factory: Any = None,
) -> AttentionContext:
    """Install ``method`` on every attention layer of the transformer. Re-installing replaces the previous one.

    ``processor_factory(adapter, method, layer_index, context, original)``, when given, builds each processor
    instead of ``adapter.make_processor`` (a method that ships its own processor subclasses, e.g. FEAT)."""
    transformer, pipe = resolve_transformer(pipe_or_model)
    adapter = get_adapter(transformer)
    if getattr(transformer, _STATE_ATTR, None) is not None:
        logger.info("diffusers-attn: replacing the previously installed attention acceleration")
        remove_attention_acceleration(transformer)
    originals = dict(transformer.attn_processors)
    keys = adapter.attention_layer_keys(originals)
    context = attach_attention_context(transformer, pipeline=pipe, num_inference_steps=num_inference_steps)
    context.stats.reset()
    context.stats.method = method.name
    context.stats.layers_per_forward = len(keys)
    procs = dict(originals)
    for i, key in enumerate(keys):
        if processor_factory is not None:
            procs[key] = processor_factory(adapter, method, i, context, originals[key])
        else:
            procs[key] = adapter.make_processor(method, i, context, original=originals[key])
    transformer.set_attn_processor(dict(procs))  # set_attn_processor consumes the dict it is given
    setattr(transformer, _STATE_ATTR, InstalledState(originals, method, context, keys))
    logger.info(
        "diffusers-attn: %s installed on %d attention layers of %s",
        method.name, len(keys), type(transformer).__name__,
    )
    return context


def remove_attention_acceleration(pipe_or_model: Any) -> bool:
    """Restore the stock processors and remove the context hook. Returns False if nothing was installed."""
    transformer, _ = resolve_transformer(pipe_or_model)
    state: InstalledState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return False
    transformer.set_attn_processor(dict(state.originals))
    detach_attention_context(transformer)
    delattr(transformer, _STATE_ATTR)
    return True


def installed_state(pipe_or_model: Any) -> InstalledState | None:
    transformer, _ = resolve_transformer(pipe_or_model)
    return getattr(transformer, _STATE_ATTR, None)


def get_attention_stats(pipe_or_model: Any, *, log: bool = True) -> AttentionStats:
    """Stats of the last generation (see :class:`~diffusers_attn.stats.AttentionStats`); logs a summary at INFO."""
    from .context import get_attention_context

    transformer, _ = resolve_transformer(pipe_or_model)
    context = get_attention_context(transformer)
    if context is None:
        raise ValueError(
            "diffusers-attn: no accelerated attention is installed on this model (call apply_rainfusion first)"
        )
    stats = context.stats.summary()
    if log:
        logger.info("%s", stats)
    return stats


def reset_attention_stats(pipe_or_model: Any) -> None:
    from .context import get_attention_context

    transformer, _ = resolve_transformer(pipe_or_model)
    context = get_attention_context(transformer)
    if context is not None:
        context.stats.reset()
