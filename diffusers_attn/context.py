"""Per-transformer runtime state, filled by a diffusers ``ModelHook`` before every transformer forward.

The hook reads the latent grid and the timestep from the transformer's own inputs (so no pipeline or processor
has to thread them through ``attention_kwargs``) and returns the inputs unchanged, so its order relative to
other hooks (caches, context parallelism splits on inner modules) does not matter. There is no global state:
each transformer owns its context.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from .stats import StatsRecorder

if TYPE_CHECKING:
    from .adapters.base import ModelAdapter

logger = logging.getLogger(__name__)

CONTEXT_HOOK_NAME = "diffusers_attn_context"


class StepTracker:
    """Denoising step index from the timestep values seen, counting each distinct value once.

    Calls with the same timestep (CFG run as separate cond/uncond forwards) belong to one step. A new generation
    starts when the schedule object changes (pipelines call ``scheduler.set_timesteps``, which creates a new
    ``timesteps`` tensor), or, without a pipeline, when the timestep moves against the schedule's direction or
    repeats an earlier value.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.call_in_step = 0
        self.current: float | None = None
        self.direction = 0
        self.seen: set[float] = set()
        self.generation = 0
        self.schedule: object = None

    def observe(self, t: float, schedule: object = None) -> bool:
        """Advance with timestep ``t``; returns True when ``t`` starts a new generation.

        ``schedule`` identifies the current generation's schedule (compared by identity; a strong reference is
        kept so the identity cannot be reused).
        """
        new_schedule = schedule is not None and schedule is not self.schedule
        if not new_schedule and self.current is not None and t == self.current:
            self.call_in_step += 1
            return False
        new_gen = self.current is None or new_schedule or t in self.seen
        if not new_gen and self.direction and (t - self.current) * self.direction < 0:
            new_gen = True
        if new_gen:
            generation = self.generation + (1 if self.current is not None else 0)
            self.reset()
            self.generation = generation
            self.step = 0
        else:
            if not self.direction:
                self.direction = 1 if t > self.current else -1
            self.step += 1
        self.call_in_step = 0
        self.current = t
        self.seen.add(t)
        if schedule is not None:
            self.schedule = schedule
        return new_gen


@dataclass
class Decision:
    """The last per-head decision of a layer (for inspection, tests and the demo's pattern plot)."""

    step: int
    patterns: np.ndarray  # (B, H) int8 pattern ids
    recalls: np.ndarray | None  # (B, H, 3) ARM recalls (spatial, temporal, textural)
    layout: Any
    params: Any
    head_offset: int = 0  # global id of patterns[:, 0] (context parallelism gives each rank a slice of heads)


class AttentionContext:
    """Runtime state shared by one transformer's accelerated processors."""

    def __init__(
        self,
        adapter: "ModelAdapter",
        pipeline: Any = None,
        num_inference_steps: int | None = None,
    ) -> None:
        self.adapter = adapter
        self.grid: tuple[int, int, int] | None = None
        self.tracker = StepTracker()
        self.stats = StatsRecorder()
        self.num_inference_steps = num_inference_steps
        self._pipe_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.last_decisions: dict[int, Decision] = {}
        self.forward_calls = 0
        self.parallel_config: Any = None  # diffusers ParallelConfig when context parallelism is enabled
        # torch.compile of the whole transformer: the hook's bookkeeping runs as a custom op (diffusers_attn.ops)
        # found by this handle; its output token orders the attention ops after it.
        from .ops import register_processor

        self.op_handle = register_processor(self)
        self.compile_token: torch.Tensor | None = None

    @property
    def pipeline(self) -> Any:
        return self._pipe_ref() if self._pipe_ref is not None else None

    @property
    def step(self) -> int:
        return max(self.tracker.step, 0)

    @property
    def call_in_step(self) -> int:
        return self.tracker.call_in_step

    @property
    def num_steps(self) -> int | None:
        """Total denoising steps of the current generation, when known."""
        pipe = self.pipeline
        n = getattr(pipe, "_num_timesteps", None) if pipe is not None else None
        return int(n) if n else self.num_inference_steps

    def begin_forward(self, grid: tuple[int, int, int], timestep: Any) -> None:
        self.grid = tuple(int(x) for x in grid)
        t = self._timestep_value(timestep)
        pipe = self.pipeline
        schedule = getattr(getattr(pipe, "scheduler", None), "timesteps", None) if pipe is not None else None
        if self.tracker.observe(t, schedule if isinstance(schedule, torch.Tensor) else None):
            self.stats.reset()
            self.last_decisions.clear()
            logger.debug("diffusers-attn: new generation %d", self.tracker.generation)
        if self.tracker.call_in_step == 0:
            self.stats.steps_seen = self.tracker.step + 1
        self.stats.forwards += 1
        self.forward_calls += 1

    def _timestep_value(self, timestep: Any) -> float:
        # Prefer the pipeline's full-precision timestep: transformer inputs may be cast to bf16, where
        # neighbouring timesteps of a shifted schedule can collide.
        pipe = self.pipeline
        current = getattr(pipe, "_current_timestep", None) if pipe is not None else None
        value = current if current is not None else timestep
        if value is None:
            raise ValueError("diffusers-attn: the transformer was called without a timestep")
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0].item())
        return float(value)

    def require_grid(self) -> tuple[int, int, int]:
        if self.grid is None:
            raise RuntimeError(
                "diffusers-attn: no latent grid recorded. The context hook must run before the attention "
                "processors: use apply_rainfusion(...) or attach_attention_context(transformer) before "
                "set_attn_processor(...)."
            )
        return self.grid


class ContextHook(ModelHook):
    """Pre-forward hook recording the latent grid and timestep into an :class:`AttentionContext`."""

    _is_stateful = False

    def __init__(self, context: AttentionContext) -> None:
        super().__init__()
        self.context = context
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        bound = self._signature.bind(module, *args, **kwargs).arguments
        grid = self.context.adapter.latent_grid(module, bound)
        timestep = bound.get("timestep")
        if torch.compiler.is_compiling():
            # Step counting reads the timestep value on the host: do it at run time inside an opaque op, not
            # while tracing (a data-dependent branch would break the graph).
            from .ops import begin_forward_op

            ctx = self.context
            ctx.grid = tuple(int(x) for x in grid)  # shapes are static in the trace; processors read the grid
            if timestep is None:
                raise ValueError("diffusers-attn: the transformer was called without a timestep")
            ctx.compile_token = begin_forward_op(torch.as_tensor(timestep), ctx.op_handle, *ctx.grid)
        else:
            self.context.compile_token = None
            self.context.begin_forward(grid, timestep)
        return args, kwargs


def attach_attention_context(
    transformer: torch.nn.Module,
    *,
    pipeline: Any = None,
    num_inference_steps: int | None = None,
) -> AttentionContext:
    """Create an :class:`AttentionContext` for ``transformer`` and register its pre-forward hook.

    Use this when installing processors by hand with ``set_attn_processor``; ``apply_*`` functions call it for
    you. Returns the existing context if one is attached already.
    """
    from .adapters import get_adapter

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(CONTEXT_HOOK_NAME)
    if hook is not None:
        ctx = hook.context
        if pipeline is not None:
            ctx._pipe_ref = weakref.ref(pipeline)
        if num_inference_steps is not None:
            ctx.num_inference_steps = num_inference_steps
        return ctx
    ctx = AttentionContext(get_adapter(transformer), pipeline=pipeline, num_inference_steps=num_inference_steps)
    registry.register_hook(ContextHook(ctx), CONTEXT_HOOK_NAME)
    return ctx


def detach_attention_context(transformer: torch.nn.Module) -> None:
    """Remove the context hook (no-op if absent)."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(CONTEXT_HOOK_NAME) is not None:
        registry.remove_hook(CONTEXT_HOOK_NAME, recurse=False)


def get_attention_context(transformer: torch.nn.Module) -> AttentionContext | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(CONTEXT_HOOK_NAME) if registry is not None else None
    return hook.context if hook is not None else None
