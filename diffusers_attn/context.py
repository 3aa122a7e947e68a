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
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .adapters import get_adapter
from .adapters.base import ModelAdapter
from .adapters.compile_op import lookup_handle, register_handle
from .adapters.token_order import TokenPermuter, permute_tokens
from .methods.base import CallInfo, MethodRecord
from .stats import StatsRecorder

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
        self.last_decisions: dict[int, Any] = {}  # layer -> the method's last decision (RainFusion: Decision)
        self.forward_calls = 0
        self.parallel_config: Any = None  # diffusers ParallelConfig when context parallelism is enabled
        # torch.compile of the whole transformer: the hook's bookkeeping runs as a custom op (begin_forward_op)
        # found by this handle; its output token orders the attention ops after it.
        self.op_handle = register_handle(self)
        self.compile_token: torch.Tensor | None = None
        self.processor_guard: ProcessorGuard | None = None  # set by the installer
        # Token order of the video tokens for this forward (set before each forward from the method's choice)
        self.order_method: Any = None  # the installed method, asked for its token order once per forward
        self.order_sites: Any = None  # the adapter's TokenOrderSites while order hooks are installed
        self.order_tile: tuple[int, int, int] | None = None  # this forward's tile sizes (None: raster)
        self.order_grid: tuple[int, int, int] | None = None  # the grid they apply to
        self.permuter: TokenPermuter | None = None  # eager only: the index tensors of ``order_tile``
        self._permuters: dict[tuple, TokenPermuter] = {}

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

    def call_info(self, layer_index: int, *, head_offset: int = 0, total_heads: int | None = None) -> CallInfo:
        """What a method may know about one attention call of this transformer."""
        return CallInfo(layer_index=layer_index, step=self.step, call_in_step=self.call_in_step,
                        num_steps=self.num_steps, head_offset=head_offset, total_heads=total_heads,
                        timer=self.stats.timers.time)

    def record(self, layer_index: int, record: MethodRecord, *, head_offset: int = 0,
               total_heads: int | None = None) -> None:
        """Write a method's record of one call into the stats (the only writer of method results)."""
        self.stats.record(
            layer_index, head_patterns=record.head_patterns, computed=record.computed, total=record.total,
            video_computed=record.video_computed, video_total=record.video_total,
            pattern_names=record.pattern_names, recalls=record.recalls, fallback_reason=record.fallback_reason,
            head_offset=head_offset, total_heads=total_heads, group=record.group,
            group_name=record.group_name, pattern_video_pairs=record.pattern_video_pairs,
        )
        if record.kernel is not None:
            self.stats.kernel_calls[record.kernel] += 1
        if record.slow_path is not None:
            self.stats.slow_path[record.slow_path] += 1
        if record.decision is not None:
            self.last_decisions[layer_index] = record.decision
        if record.info:
            self.stats.info.update(record.info)

    def begin_generation(self) -> None:
        """Start a new generation by hand (models whose generation is not a sequence of timestep forwards)."""
        self.stats.reset()
        self.last_decisions.clear()
        self.tracker.reset()

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

    @property
    def token_order(self) -> tuple[int, int, int] | None:
        """Tile sizes of this forward's video token order (None: raster)."""
        return self.order_tile

    def set_token_order(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Ask the method for this forward's token order (a function of the grid only, so every layer agrees).

        While ``torch.compile`` traces, only the tile sizes are kept (static for a traced shape); the permutation
        itself runs inside the opaque op ``diffusers_attn::permute_tokens``, which finds its index tensors here."""
        tile = None
        if self.order_sites is not None and self.order_method is not None:
            tile = self.order_method.token_order(tuple(int(x) for x in grid))
        self.order_tile = tuple(int(x) for x in tile) if tile is not None else None
        self.order_grid = tuple(int(x) for x in grid)
        if tile is None or torch.compiler.is_compiling():
            self.permuter = None
            return
        self.permuter = self.permuter_for(grid, self.order_tile, device)

    def permuter_for(self, grid: tuple[int, int, int], tile: tuple[int, int, int],
                     device: torch.device) -> TokenPermuter:
        key = (tuple(int(x) for x in grid), tuple(tile), device)
        p = self._permuters.get(key)
        if p is None:
            p = self._permuters[key] = TokenPermuter(key[0], key[1], device)
        return p

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
        inputs = self.context.adapter.forward_inputs(module, bound)
        if inputs is None:
            if self.context.processor_guard is not None and not torch.compiler.is_compiling():
                self.context.processor_guard.check(self.context)
            return args, kwargs
        grid, timestep = inputs
        ctx = self.context
        ctx.set_token_order(grid, _device_of(module))
        if ctx.order_tile is not None and ctx.order_sites.forward_kwargs:
            args, kwargs = self._permute_inputs(module, args, kwargs, ctx)
        if torch.compiler.is_compiling():
            # Step counting reads the timestep value on the host: do it at run time inside an opaque op, not
            # while tracing (a data-dependent branch would break the graph).
            ctx = self.context
            ctx.grid = tuple(int(x) for x in grid)  # shapes are static in the trace; processors read the grid
            if timestep is None:
                raise ValueError("diffusers-attn: the transformer was called without a timestep")
            ctx.compile_token = begin_forward_op(torch.as_tensor(timestep), ctx.op_handle, *ctx.grid)
        else:
            self.context.compile_token = None
            self.context.begin_forward(grid, timestep)
            if self.context.processor_guard is not None:  # after begin_forward: a new generation resets the stats
                self.context.processor_guard.check(self.context)
        return args, kwargs

    def _permute_inputs(self, module, args, kwargs, ctx):
        """Put the transformer inputs built outside it (e.g. CogVideoX's RoPE tables) into the token order."""
        bound = self._signature.bind(module, *args, **kwargs)
        for name, dim in ctx.order_sites.forward_kwargs.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = permute_tokens(ctx, bound.arguments[name], dim, inverse=False)
        return bound.args[1:], bound.kwargs


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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


class ProcessorGuard:
    """Notices when something replaced the installed processors (e.g. ``fuse_qkv_projections()``, which installs
    diffusers' fused processor on every layer) before each forward, so the output never silently turns stock while
    the stats still claim the method. A stock processor of the model is replaced by ours again (our processors read
    fused projections too); anything else is left alone, logged once and named in the stats."""

    def __init__(self, modules: dict[str, torch.nn.Module], processors: dict[str, Any],
                 native: tuple[type, ...]) -> None:
        self.modules, self.processors, self.native = modules, processors, native
        self._warned: set[str] = set()

    def check(self, context: "AttentionContext") -> None:
        replaced = [k for k, m in self.modules.items() if m.processor is not self.processors[k]]
        if not replaced:
            return
        foreign = []
        for key in replaced:
            proc = self.modules[key].processor
            if isinstance(proc, self.native):
                self.modules[key].set_processor(self.processors[key])
            else:
                foreign.append(f"{key} ({type(proc).__name__})")
        restored = len(replaced) - len(foreign)
        if restored:
            context.stats.static_info["reinstalled_processors"] = restored
            context.stats.info["reinstalled_processors"] = restored
            if "restored" not in self._warned:
                self._warned.add("restored")
                logger.info("diffusers-attn: %d layers had their stock processor put back (e.g. by "
                            "fuse_qkv_projections()); %s re-installed (fused projections are supported)",
                            restored, context.stats.method)
        if foreign:
            context.stats.info["foreign_processors"] = foreign
            if "foreign" not in self._warned:
                self._warned.add("foreign")
                logger.warning("diffusers-attn: %d layers now carry another processor (%s): %s does not run there",
                               len(foreign), ", ".join(foreign[:3]), context.stats.method)


@torch.library.custom_op("diffusers_attn::begin_forward", mutates_args=())
def begin_forward_op(timestep: torch.Tensor, handle: int, frames: int, height: int, width: int) -> torch.Tensor:
    """The context hook's bookkeeping at run time when the whole transformer is compiled (see ContextHook)."""
    lookup_handle(handle, "attention context").begin_forward((frames, height, width), timestep)
    return timestep.new_zeros(1, dtype=torch.float32)


@begin_forward_op.register_fake
def _(timestep, handle, frames, height, width):
    return timestep.new_empty(1, dtype=torch.float32)
