"""RainFusion-style training-free sparse attention for 3D video DiTs (this project's ``rf1`` definitions).

Per attention call, each head is assigned one pattern by the ARM recognizer (adaptive recognition module):

* **Spatial**: a query in latent frame t sees whole frames t' with |t' - t| <= w.
* **Temporal**: a query at row h sees rows |h' - h| <= r_h of every frame.
* **Textural**: a query sees a fixed 1/s^2 strided subsample of every frame.
* **Dense**: when no pattern keeps at least ``arm_threshold`` of the sampled attention mass.

Among the patterns that keep enough, ARM takes the one with the lowest executed density (``arm_rule``).

Text tokens and the first latent frame are always dense (as rows and as columns). Spatial and temporal run as
block lists on :func:`diffusers_attn.kernels.block_sparse_attention` in natural token order ("relaxed" block
semantics: a query attends to every key of each listed block); textural gathers its keys and runs a dense kernel.
ARM probes ~``probe_budget`` of the call's FLOPs: exact fp32 softmax rows for a few queries spread over (t, h, w),
scoring how much mass each pattern's *executed* mask keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ...kernels import fast_kernel_unavailable, select_backend
from ...layout import TokenLayout
from ..base import CallInfo, MethodRecord, dense_record, valid_key_counts
from .config import (
    DENSE,
    PATTERN_NAMES,
    SPARSE_PATTERNS,
    TEXTURAL,
    PatternParams,
    RainFusionConfig,
    pattern_params,
)
from .execution import execute_grouped, execute_tables
from .plan import RainFusionPlan
from .recognition import arm_recalls, choose_patterns
from .rf2 import RF2Attention
from .windows import Solution, solve_params

logger = logging.getLogger(__name__)


@dataclass
class Decision:
    """The last per-head decision of a layer (for inspection, tests and the demo's pattern plot)."""

    step: int
    patterns: np.ndarray  # (B, H) int8 pattern ids
    recalls: np.ndarray | None  # (B, H, 3) ARM recalls (spatial, temporal, textural)
    layout: Any
    params: Any
    head_offset: int = 0  # global id of patterns[:, 0] (context parallelism gives each rank a slice of heads)


@dataclass
class _ArmCacheEntry:
    step: int
    key: tuple
    patterns: np.ndarray
    recalls: np.ndarray | None


class RainFusionMethod:
    """The RainFusion attention method; one instance is shared by all layers of a transformer."""

    name = "rainfusion"
    supports_context_parallel = True  # per-head state is keyed by global head ids

    def __init__(self, config: RainFusionConfig | None = None) -> None:
        self.config = config or RainFusionConfig()
        self._plans: dict[tuple, RainFusionPlan] = {}
        self._arm_cache: dict[tuple[int, int], _ArmCacheEntry] = {}
        self._warned: set[str] = set()
        self._solutions: dict[tuple, Solution] = {}
        self.budget_unmet: dict[tuple[int, int, int], list[str]] = {}  # grid -> patterns that exceed the budget

    # ----------------------------------------------------------------- schedule
    def fallback_reason(self, layout: TokenLayout, layer_index: int, progress: Any) -> str | None:
        """Why this call must run dense, or None when it may be sparse. ``progress`` has ``step`` and
        ``num_steps`` (a :class:`~diffusers_attn.methods.base.CallInfo` or the transformer's context)."""
        cfg = self.config
        if cfg.sparsity == 0:
            return "sparsity=0"
        if layer_index < cfg.dense_layers:
            return "dense layer (dense_layers)"
        if layer_index in cfg.skip_layers:
            return "dense layer (skip_layers)"
        total = progress.num_steps
        step = progress.step
        if step < cfg.steps_from(cfg.dense_steps, total, "dense_steps"):
            return "dense warm-up step"
        tail = cfg.steps_from(cfg.dense_tail_steps, total, "dense_tail_steps")
        if tail and total is not None and step >= total - tail:
            return "dense tail step"
        if cfg.force_pattern == "dense":
            return "force_pattern='dense'"
        if layout.frames <= 2:
            return "2 or fewer latent frames"
        if cfg.min_video_tokens and layout.num_video < cfg.min_video_tokens:
            return f"fewer than min_video_tokens={cfg.min_video_tokens} video tokens"
        return None

    def token_order(self, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """Tile sizes the transformer should run its video tokens in for this grid (None: the model's order).
        Only where some call may be sparse: a permutation buys nothing for dense runs."""
        cfg = self.config
        if cfg.token_order != "tiles" or cfg.sparsity == 0 or grid[0] <= 2:
            return None
        if cfg.min_video_tokens and grid[0] * grid[1] * grid[2] < cfg.min_video_tokens:
            return None
        return cfg.resolved_tile

    def params(self, layout: TokenLayout) -> PatternParams:
        """Pattern windows for this layout: in tile order, the densest windows within the budget (solved once per
        shape; a budget no window can meet is logged once and kept in ``budget_unmet``); in raster order, the
        frame/row bands of ``pattern_params``."""
        cfg = self.config
        if layout.order is None:
            return pattern_params(cfg, layout.grid)
        key = (layout, cfg.block_m, cfg.block_n)
        sol = self._solutions.get(key)
        if sol is None:
            sol = self._solutions[key] = solve_params(
                layout, cfg.sparsity, cfg.block_m, cfg.block_n, window=cfg.spatial_window, rows=cfg.temporal_rows,
                stride=cfg.textural_stride,
            )
            unmet = sorted(p for p, ok in sol.met.items() if not ok)
            if unmet:
                self.budget_unmet[layout.grid] = unmet
                logger.warning(
                    "diffusers-attn: RainFusion cannot meet sparsity=%s on grid %s with %s (the first frame, text "
                    "and block rounding alone exceed 1 - sparsity); they run at their smallest window",
                    cfg.sparsity, layout.grid, ", ".join(unmet),
                )
        return sol.params

    def plan(self, layout: TokenLayout) -> RainFusionPlan:
        cfg = self.config
        params = self.params(layout)
        key = (layout, params, cfg.block_m, cfg.block_n, cfg.probe_budget, cfg.probe_min_rows)
        plan = self._plans.get(key)
        if plan is None:
            plan = RainFusionPlan(layout, params, cfg.block_m, cfg.block_n, cfg.probe_budget, cfg.probe_min_rows)
            self._plans[key] = plan
        return plan

    # ----------------------------------------------------------------- call
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
        call: CallInfo,
        dense_fn: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, MethodRecord]:
        """Attention for heads ``[call.head_offset, call.head_offset + H)`` (context parallelism gives a rank a
        slice of the heads over the whole sequence; per-head state uses global ids)."""
        if self.config.mode == "rf2":  # RainFusion 2.0: block top-k instead of ARM patterns (rf2.py)
            return RF2Attention.of(self).attend(q, k, v, layout=layout, key_padding_mask=key_padding_mask,
                                                scale=scale, call=call, dense_fn=dense_fn)
        B, H, N, D = q.shape
        if N != layout.seq_len or k.shape[2] != N:
            raise ValueError(
                f"RainFusion: sequence length {N} (keys {k.shape[2]}) does not match the layout "
                f"{layout} (expected {layout.seq_len}); the latent grid from the context hook disagrees with the "
                "attention inputs"
            )
        reason = self.fallback_reason(layout, call.layer_index, call)
        if reason is not None:
            valid = valid_key_counts(key_padding_mask, B, N)
            return dense_fn(), dense_record(reason, batch=B, heads=H, head_dim=D, n_q=N, n_k_valid=float(sum(valid)),
                                            n_video=layout.num_video, pattern_names=PATTERN_NAMES)

        dev = q.device
        with call.timer("plan", dev):
            plan = self.plan(layout)
            dplan = plan.on(dev)
        patterns, recalls, valid = self._decide(q, k, plan, dplan, key_padding_mask, scale, call)
        record = self._record(plan, patterns, recalls, valid, D)
        record.decision = Decision(call.step, patterns, recalls, layout, plan.params, call.head_offset)
        with call.timer("attention", dev):
            if (patterns == DENSE).all():
                return dense_fn(), record  # every head stays dense: the stock call is the fastest exact dense path
            return self._execute(q, k, v, patterns, plan, dplan, key_padding_mask, scale, call, record), record

    # ----------------------------------------------------------------- ARM
    def _decide(self, q, k, plan, dplan, kpm, scale, call: CallInfo):
        cfg = self.config
        B, H, N, _ = q.shape
        valid = valid_key_counts(kpm, B, N)
        if cfg.force_pattern is not None:
            pid = SPARSE_PATTERNS[cfg.force_pattern]
            if pid == TEXTURAL and plan.params.stride == 1:
                pid = DENSE
            return np.full((B, H), pid, dtype=np.int8), None, valid

        cache_key = (call.layer_index, call.call_in_step)
        shape_key = (plan.layout, plan.params, B, H)
        if cfg.arm_refresh_steps > 1:
            hit = self._arm_cache.get(cache_key)
            if hit is not None and hit.key == shape_key and 0 <= call.step - hit.step < cfg.arm_refresh_steps:
                return hit.patterns, hit.recalls, valid

        # A recognizer, not part of the model: no autograd graph (q, k may require grad when training or probing).
        with call.timer("arm", q.device), torch.no_grad():
            recalls = arm_recalls(q.detach(), k.detach(), plan, dplan, kpm, scale, backend=cfg.kernel_backend)
            candidates = [SPARSE_PATTERNS[p] for p in cfg.patterns]
            patterns = choose_patterns(recalls, plan, candidates, cfg.arm_threshold, cfg.arm_rule)  # (B, H)
            packed = torch.cat([patterns.float().unsqueeze(-1), recalls], dim=-1).cpu().numpy()
        patterns_np = packed[..., 0].astype(np.int8)
        recalls_np = packed[..., 1:].astype(np.float32)
        if cfg.arm_refresh_steps > 1:
            self._arm_cache[cache_key] = _ArmCacheEntry(call.step, shape_key, patterns_np, recalls_np)
        return patterns_np, recalls_np, valid

    # ----------------------------------------------------------------- execution
    def _execute(self, q, k, v, patterns, plan, dplan, kpm, scale, call: CallInfo, record: MethodRecord):
        cfg = self.config
        backend = select_backend(q, k, v, cfg.block_m, cfg.block_n, cfg.kernel_backend)
        record.kernel = backend
        if q.is_cuda and backend != "triton":
            # Exact but slow on a GPU: say so once, and count it in stats.
            reason = fast_kernel_unavailable(q, k, v, cfg.block_m, cfg.block_n) or f"kernel_backend={backend!r}"
            record.slow_path = reason
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning("diffusers-attn: RainFusion runs its sparse calls on the PyTorch path on %s: %s",
                               q.device, reason)
        run = execute_tables if backend == "triton" else execute_grouped
        return run(cfg, q, k, v, patterns, plan, dplan, kpm, scale, call.timer)

    # ----------------------------------------------------------------- accounting
    def _record(self, plan, patterns, recalls, valid, head_dim) -> MethodRecord:
        B, H = patterns.shape
        computed = total = vcomp = 0.0
        nv2 = float(plan.layout.num_video) ** 2
        per_pattern: dict[str, tuple[float, float]] = {}  # executed video pairs per pattern, for the stats
        for b in range(B):
            # Padding is text padding in the supported models; execution is exact either way, only the
            # accounting assumes it sits in the text tail.
            padded = min(plan.n - valid[b], plan.layout.text_len)
            for p in np.unique(patterns[b]):
                nh = int((patterns[b] == p).sum())
                c, t = plan.pairs(int(p), padded)
                computed += c * nh
                total += t * nh
                vp = plan.video_pairs(int(p)) * nh
                vcomp += vp
                name = PATTERN_NAMES[int(p)]
                pc, pt = per_pattern.get(name, (0.0, 0.0))
                per_pattern[name] = (pc + vp * head_dim, pt + nv2 * nh * head_dim)
        vtot = nv2 * B * H
        return MethodRecord(
            head_patterns=patterns.astype(np.int64),
            computed=computed * head_dim,
            total=total * head_dim,
            video_computed=vcomp * head_dim,
            video_total=vtot * head_dim,
            pattern_names=PATTERN_NAMES,
            recalls=recalls,
            pattern_video_pairs=per_pattern,
        )
