"""Multi-GPU through diffusers' own context parallelism (Ulysses), for this package's processors.

Sharding plan ("joint" style, as FastVideo/xDiT): only the video tokens are split across ranks (and the video RoPE
tables with them); text stays replicated. Inside each accelerated processor the video q/k/v go through one
all-to-all from (local sequence, all heads) to (full sequence, local heads); the local-head slice of the replicated
text is appended, so the method sees the canonical token order ``[text, video (t, h, w)]`` / ``[video, text]`` of
the whole sequence for its heads, exactly as on one GPU. Per-head state is indexed by the global head id. Afterwards
the video output goes back with the inverse all-to-all and the text output is all-gathered over heads.

Ring attention is refused: sparse patterns need every key of a query block on one rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from .adapters import get_adapter
from .adapters.token_order import register_order_hooks
from .adapters.ulysses import UlyssesExchange, global_to_joint, joint_to_global
from .context import CONTEXT_HOOK_NAME, ContextHook
from .install import installed_state, pipeline_transformers, resolve_transformer

logger = logging.getLogger(__name__)


def cp_plan_for(transformer: torch.nn.Module) -> dict[str, Any]:
    """The context-parallel plan this package uses for ``transformer`` (video-only sharding)."""
    adapter = get_adapter(transformer)
    plan = adapter.cp_plan(transformer)
    if plan is None:
        raise ValueError(f"diffusers-attn: no context-parallel plan for {type(transformer).__name__}")
    return plan


def enable_context_parallel(
    pipe_or_model: Any,
    *,
    ulysses_degree: int | None = None,
    ring_degree: int = 1,
    mesh: Any = None,
) -> Any:
    """Shard the transformer's video tokens over ``ulysses_degree`` ranks with diffusers' context parallelism.

    Call after ``apply_rainfusion`` (use ``RainFusionConfig(sparsity=0)`` for a dense baseline) inside an
    initialised ``torch.distributed`` job (``torchrun``), with the model on this rank's device. Returns the
    diffusers ``ParallelConfig``. On CUDA this goes through ``ModelMixin.enable_parallelism``; without an accelerator
    (CPU tests, gloo) the same pieces are set up by hand, because diffusers' device lookup needs one. A pipeline's
    second accelerated transformer (Wan 2.2 A14B's ``transformer_2``) is sharded too.
    """
    from diffusers.hooks import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    experts = [t for name, t in pipeline_transformers(pipe_or_model).items() if name != "transformer"]
    experts = [t for t in experts if installed_state(t) is not None]
    if experts:  # Wan 2.2 A14B: shard every accelerated transformer of the pipeline the same way
        transformer, _ = resolve_transformer(pipe_or_model)
        config = enable_context_parallel(transformer, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                                         mesh=mesh)
        for expert in experts:
            enable_context_parallel(expert, ulysses_degree=ulysses_degree, ring_degree=ring_degree, mesh=mesh)
        return config
    transformer, _ = resolve_transformer(pipe_or_model)
    state = installed_state(transformer)
    if state is None:
        raise ValueError(
            "diffusers-attn: install an accelerated attention first (apply_rainfusion(pipe, RainFusionConfig("
            "sparsity=0)) for a dense baseline): the stock processors do not know this package's sharding plan"
        )
    if ring_degree > 1:
        raise ValueError(
            "diffusers-attn: ring attention is not supported by the accelerated processors (sparse patterns need "
            "every key of a query block on one rank); use ulysses_degree"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("diffusers-attn: torch.distributed must be initialised (launch with torchrun)")
    world = dist.get_world_size()
    ulysses_degree = ulysses_degree or world
    plan = cp_plan_for(transformer)
    cp_config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=1, mesh=mesh)
    if torch.cuda.is_available() and next(transformer.parameters()).is_cuda:
        transformer.enable_parallelism(config=cp_config, cp_plan=plan)
        config = transformer._parallel_config
    else:
        from torch.distributed.device_mesh import init_device_mesh

        rank = dist.get_rank()
        device = next(transformer.parameters()).device
        if mesh is None:
            mesh = init_device_mesh(device.type, (1, ulysses_degree), mesh_dim_names=("ring", "ulysses"))
        config = ParallelConfig(context_parallel_config=cp_config)
        config.setup(rank, world, device, mesh=mesh)
        for proc in transformer.attn_processors.values():
            if hasattr(proc, "_parallel_config"):
                proc._parallel_config = config
        apply_context_parallel(transformer, cp_config, plan)
        transformer._parallel_config = config
    state.context.parallel_config = config
    if state.context.order_sites is not None:
        # The inverse permutation must see the gathered sequence: re-register it outside the gather hooks.
        register_order_hooks(transformer, state.context.order_sites, state.context, which="unpermute")
        if state.context.order_sites.forward_kwargs:
            # Transformer inputs in the token order (Wan TI2V's per-token timestep) are permuted by the context
            # hook, which must then run before a split of the same input at the model itself: make it outermost.
            registry = transformer._diffusers_hook
            registry.remove_hook(CONTEXT_HOOK_NAME, recurse=False)
            registry.register_hook(ContextHook(state.context), CONTEXT_HOOK_NAME)
    logger.info("diffusers-attn: Ulysses context parallelism over %d ranks", ulysses_degree)
    return config


__all__ = ["UlyssesExchange", "cp_plan_for", "enable_context_parallel", "global_to_joint", "joint_to_global"]
