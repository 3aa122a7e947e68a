"""Installing and removing accelerated attention on a pipeline or transformer: the one place for that logic,
for every method.

Installation builds the ``set_attn_processor`` dict from ``transformer.attn_processors`` (replacing only the
model's attention layers, never e.g. HunyuanVideo's text refiner), keeps the original dict for restoring, registers
the context hook and a guard that notices replaced processors. Nothing is patched globally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import get_adapter, supported_transformers
from .adapters.token_order import register_order_hooks, remove_order_hooks
from .context import (
    AttentionContext,
    ProcessorGuard,
    attach_attention_context,
    detach_attention_context,
    get_attention_context,
)
from .methods.base import AttentionMethod
from .stats import AttentionStats, combine_stats

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


#: pipeline attributes of the transformers a pipeline may switch between within one run (Wan 2.2 A14B)
SECOND_TRANSFORMERS = ("transformer_2",)


def pipeline_transformers(pipe_or_model: Any) -> dict[str, torch.nn.Module]:
    """``{"transformer": ..., "transformer_2": ...}``: every transformer of a pipeline (one for a bare model)."""
    transformer, pipe = resolve_transformer(pipe_or_model)
    out = {"transformer": transformer}
    for name in SECOND_TRANSFORMERS:
        module = getattr(pipe, name, None) if pipe is not None else None
        if isinstance(module, torch.nn.Module):
            out[name] = module
    return out


def install_method(
    pipe_or_model: Any,
    method: AttentionMethod,
    *,
    num_inference_steps: int | None = None,
    processor_cls: type | None = None,
    pipeline: Any = None,
) -> AttentionContext:
    """Install ``method`` on every attention layer of the transformer. Re-installing replaces the previous one.

    ``processor_cls``, when given, is a subclass of the adapter's processor to build instead (a method that ships
    its own processor subclass, e.g. FEAT). A method may define ``on_install(transformer) -> dict`` (its return
    value is kept in the stats' info, e.g. which linears were quantized) and ``on_remove(transformer)``.
    ``pipeline``: the pipeline a bare transformer belongs to (its second transformer), for step counting."""
    transformer, pipe = resolve_transformer(pipe_or_model)
    pipe = pipe if pipe is not None else pipeline
    adapter = get_adapter(transformer)
    kinds = getattr(method, "layouts", ("video",))
    if adapter.layout_kind not in kinds:
        raise ValueError(
            f"diffusers-attn: {method.name} does not run on {type(transformer).__name__}; supported: "
            f"{', '.join(n for k in kinds for n in supported_transformers(k))}"
        )
    if getattr(transformer, _STATE_ATTR, None) is not None:
        logger.info("diffusers-attn: replacing the previously installed attention acceleration")
        remove_attention_acceleration(transformer)
    originals = dict(transformer.attn_processors)
    keys = adapter.attention_layer_keys(originals)
    on_install = getattr(method, "on_install", None)
    info = on_install(transformer) if on_install is not None else None
    context = attach_attention_context(transformer, pipeline=pipe, num_inference_steps=num_inference_steps)
    context.stats.static_info = dict(info or {})
    context.stats.method = method.name
    context.stats.layers_per_forward = adapter.layers_per_forward(keys)
    context.begin_generation()
    procs = dict(originals)
    for i, key in enumerate(keys):
        procs[key] = adapter.make_processor(method, i, context, original=originals[key], processor_cls=processor_cls)
    ours = {key: procs[key] for key in keys}
    transformer.set_attn_processor(dict(procs))  # set_attn_processor consumes the dict it is given
    modules = {key: transformer.get_submodule(key[: -len(".processor")]) for key in keys}
    context.processor_guard = ProcessorGuard(modules, ours, adapter.native_processor_classes())
    sites = adapter.token_order_sites(transformer) if hasattr(method, "token_order") else None
    if sites is not None:  # the method may run the video tokens in its own order (decided per forward)
        register_order_hooks(transformer, sites, context)
        context.order_method, context.order_sites = method, sites
    setattr(transformer, _STATE_ATTR, InstalledState(originals, method, context, keys))
    logger.info(
        "diffusers-attn: %s installed on %d attention layers of %s",
        method.name, len(keys), type(transformer).__name__,
    )
    return context


def remove_attention_acceleration(pipe_or_model: Any) -> bool:
    """Restore the stock processors (and whatever the method changed at install, e.g. quantized linears) and
    remove the context hook, whatever method is installed, on every transformer of a pipeline (both experts of
    Wan 2.2 A14B). Returns False if nothing was installed."""
    removed = [_remove_one(t) for t in pipeline_transformers(pipe_or_model).values()]
    return any(removed)


def _remove_one(transformer: torch.nn.Module) -> bool:
    state: InstalledState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return False
    transformer.set_attn_processor(dict(state.originals))
    on_remove = getattr(state.method, "on_remove", None)
    if on_remove is not None:
        on_remove(transformer)
    state.context.processor_guard = None
    if state.context.order_sites is not None:
        remove_order_hooks(transformer, state.context.order_sites)
        state.context.order_method = state.context.order_sites = state.context.permuter = None
    detach_attention_context(transformer)
    delattr(transformer, _STATE_ATTR)
    return True


def installed_state(pipe_or_model: Any) -> InstalledState | None:
    transformer, _ = resolve_transformer(pipe_or_model)
    return getattr(transformer, _STATE_ATTR, None)


def get_attention_stats(pipe_or_model: Any, *, log: bool = True) -> AttentionStats:
    """Stats of the last generation (see :class:`~diffusers_attn.stats.AttentionStats`); logs a summary at INFO.

    A pipeline with two accelerated transformers (Wan 2.2 A14B) gets their totals, each one's own stats in
    ``per_transformer``."""
    contexts = {name: get_attention_context(t) for name, t in pipeline_transformers(pipe_or_model).items()}
    contexts = {name: c for name, c in contexts.items() if c is not None}
    if not contexts:
        raise ValueError(
            "diffusers-attn: no accelerated attention is installed on this model (call an apply_* function first)"
        )
    if len(contexts) == 1:
        stats = next(iter(contexts.values())).stats.summary()
    else:
        stats = combine_stats({name: c.stats for name, c in contexts.items()})
    if log:
        logger.info("%s", stats)
    return stats


def reset_attention_stats(pipe_or_model: Any) -> None:
    for transformer in pipeline_transformers(pipe_or_model).values():
        context = get_attention_context(transformer)
        if context is not None:
            context.stats.reset()
