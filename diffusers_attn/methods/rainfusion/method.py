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

from ...kernels import dense_route, fast_kernel_unavailable, select_backend
from ...kernels.memo import TensorMemo
from ...kernels.selfcheck import stats_info as kernel_check_info
from ...layout import TokenLayout
from ..base import CallInfo, MethodRecord, deferred_record, dense_record
from .config import (
    DENSE,
    PATTERN_NAMES,
    SPARSE_PATTERNS,
    TEXTURAL,
    PatternParams,
    RainFusionConfig,
    pattern_params,
)
from .execution import cfg_candidates, execute_grouped, execute_tables
from .plan import RainFusionPlan
from .recognition import arm_recalls, choose_patterns
from .rf2 import RF2Attention
from .windows import Solution, solve_params

logger = logging.getLogger(__name__)


class Decision:
    """The last per-head decision of a layer (for inspection, tests and the demo's pattern plot). ``patterns``
    (B, H) int8 and ``recalls`` (B, H, 3) fp32 (ARM recalls: spatial, temporal, textural; None when forced) are
    host arrays, read from the device on first access (never on the hot path)."""

    def __init__(self, step: int, patterns: torch.Tensor | np.ndarray, recalls: torch.Tensor | np.ndarray | None,
                 layout: Any, params: Any, head_offset: int = 0) -> None:
        self.step, self.layout, self.params = step, layout, params
        self.head_offset = head_offset  # global id of patterns[:, 0] (context parallelism gives a rank a slice)
        self._patterns, self._recalls = patterns, recalls

    @property
    def patterns(self) -> np.ndarray:
        if isinstance(self._patterns, torch.Tensor):
            self._patterns = self._patterns.cpu().numpy().astype(np.int8)
        return self._patterns

    @property
    def recalls(self) -> np.ndarray | None:
        if isinstance(self._recalls, torch.Tensor):
            self._recalls = self._recalls.cpu().numpy().astype(np.float32)
        return self._recalls

    def __repr__(self) -> str:
        return f"Decision(step={self.step}, layout={self.layout}, params={self.params})"


@dataclass
class _ArmCacheEntry:
    step: int
    key: tuple
    patterns: torch.Tensor  # (B, H) int32 on the device
    recalls: torch.Tensor | None
    host: np.ndarray | None = None  # the decisions on the host, once read
    copy: Any = None  # (pinned host buffer, CUDA event) of a copy in flight


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
        tile = cfg.resolved_tile
        # A tile covering whole frames orders tokens exactly as raster does and a query block spans at least a
        # frame, so there is nothing to localize: keep the raster plan, whose windows are calibrated for such small
        # grids (e.g. 8 x 8 frames with the 128-token default tile).
        if tile[1] >= grid[1] and tile[2] >= grid[2]:
            return None
        return tile

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
        dense = self._checked_or_dense(q, k, layout, key_padding_mask, call, dense_fn, PATTERN_NAMES, "RainFusion")
        if dense is not None:
            return dense
        B, H, N, D = q.shape
        dev = q.device
        with call.timer("plan", dev):
            plan = self.plan(layout)
            dplan = plan.on(dev)
        patterns, recalls, entry = self._decide(q, k, plan, dplan, key_padding_mask, scale, call)
        record = self._record(plan, patterns, recalls, entry, self._valid_counts(key_padding_mask), B, N, D)
        record.decision = Decision(call.step, patterns if entry.host is None else entry.host, recalls, layout,
                                   plan.params, call.head_offset)
        with call.timer("attention", dev):
            out = self._execute(q, k, v, patterns, entry, plan, dplan, key_padding_mask, scale, call, record)
        if out is None:  # every head stays dense: the stock call is the fastest exact dense path
            return dense_fn(), record
        return out, record

    def _checked_or_dense(self, q, k, layout: TokenLayout, key_padding_mask, call: CallInfo,
                          dense_fn: Callable[[], torch.Tensor], pattern_names, who: str):
        """The start every sparse call shares (rf1, rf2, random blocks): the sequence must match the layout, and a
        call the schedule keeps dense (warm-up step, dense layer, short video) returns ``(stock output, record)``.
        None: go on with the sparse call."""
        B, H, N, D = q.shape
        if N != layout.seq_len or k.shape[2] != N:
            raise ValueError(
                f"{who}: sequence length {N} (keys {k.shape[2]}) does not match the layout {layout} (expected "
                f"{layout.seq_len}); the latent grid from the context hook disagrees with the attention inputs"
            )
        reason = self.fallback_reason(layout, call.layer_index, call)
        if reason is None:
            return None
        valid = self._valid_counts(key_padding_mask)
        return dense_fn(), dense_record(reason, batch=B, heads=H, head_dim=D, n_q=N,
                                        n_k_valid=float(N * B) if valid is None else valid,
                                        n_video=layout.num_video, pattern_names=pattern_names)

    def _valid_counts(self, kpm: torch.Tensor | None) -> torch.Tensor | None:
        """Valid keys per batch element on the device (None: no padding), for the stats. Every layer of a forward
        gets the same mask: the count is reused while the mask is unchanged."""
        if kpm is None:
            return None
        memo = self.__dict__.get("_valid_memo")
        if memo is None:
            memo = self._valid_memo = TensorMemo()
        return memo.get(kpm, lambda: kpm.sum(-1))

    # ----------------------------------------------------------------- ARM
    def _decide(self, q, k, plan, dplan, kpm, scale, call: CallInfo):
        """``(patterns int32 (B, H), recalls (B, H, 3) or None, cache entry)``, all on the device; the entry also
        carries the decisions on the host once they have been read (or when they are known without a read)."""
        cfg = self.config
        B, H = q.shape[:2]
        if cfg.force_pattern is not None:
            pid = SPARSE_PATTERNS.get(cfg.force_pattern, DENSE)
            if pid == TEXTURAL and plan.params.stride == 1:
                pid = DENSE
            host = np.full((B, H), pid, dtype=np.int8)
            return (torch.full((B, H), pid, dtype=torch.int32, device=q.device), None,
                    _ArmCacheEntry(call.step, (), None, None, host))

        cache_key = (call.layer_index, call.call_in_step)
        shape_key = (plan.layout, plan.params, B, H, q.device)
        if cfg.arm_refresh_steps > 1:
            hit = self._arm_cache.get(cache_key)
            if hit is not None and hit.key == shape_key and 0 <= call.step - hit.step < cfg.arm_refresh_steps:
                return hit.patterns, hit.recalls, hit

        # A recognizer, not part of the model: no autograd graph (q, k may require grad when training or probing).
        with call.timer("arm", q.device), torch.no_grad():
            recalls = arm_recalls(q, k, plan, dplan, kpm, scale, backend=cfg.kernel_backend)
            candidates = [SPARSE_PATTERNS[p] for p in cfg.patterns]
            patterns = choose_patterns(recalls, plan, candidates, cfg.arm_threshold, cfg.arm_rule,
                                       out_dtype=torch.int32)  # (B, H), on the device
        entry = _ArmCacheEntry(call.step, shape_key, patterns, recalls)
        if cfg.arm_refresh_steps > 1:
            self._arm_cache[cache_key] = entry
        return patterns, recalls, entry

    # ----------------------------------------------------------------- execution
    def _execute(self, q, k, v, patterns, entry, plan, dplan, kpm, scale, call: CallInfo, record: MethodRecord):
        cfg = self.config
        backend = select_backend(q, k, v, cfg.block_m, cfg.block_n, cfg.kernel_backend)
        record.kernel = backend
        record.info.update(kernel_check_info())  # failed first-use kernel checks (and their fallbacks), if any
        if q.is_cuda and backend != "triton":
            # Exact but slow on a GPU: say so once, and count it in stats.
            reason = fast_kernel_unavailable(q, k, v, cfg.block_m, cfg.block_n) or f"kernel_backend={backend!r}"
            record.slow_path = reason
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning("diffusers-attn: RainFusion runs its sparse calls on the PyTorch path on %s: %s",
                               q.device, reason)
        if backend == "triton":
            route = self._dense_route(q, k, v, kpm, scale, plan)
            record.info["dense_heads"] = route
            record.info.update(dense_route.stats_info())  # the one-time route timings, if any
            if route == "sdpa" and entry.host is None and patterns.is_cuda:
                self._start_copy(entry)  # queued before the sparse kernel, so waiting on it never waits for that
            return execute_tables(cfg, route, q, k, v, patterns, entry.host, plan, dplan, kpm, scale, call.timer,
                                  lambda: self._read_host(entry))
        host = self._read_host(entry)
        if (host == DENSE).all():
            return None
        return execute_grouped(cfg, q, k, v, host, plan, dplan, kpm, scale, call.timer)

    def _dense_route(self, q, k, v, kpm, scale, plan: RainFusionPlan) -> str:
        """Where this call's dense heads run on the Triton path: ``"kernel"`` or ``"sdpa"`` (``dense_heads``;
        ``"auto"`` measures once per device and shape on CUDA, takes SDPA elsewhere: off CUDA, Triton is the
        interpreter and timing it says nothing)."""
        cfg = self.config
        if cfg.dense_heads != "auto":
            return cfg.dense_heads
        if DENSE not in cfg_candidates(cfg, plan):
            return "kernel"  # no head can be dense: nothing to route, and no host read
        if not dense_route.measures(q.device):
            return "sdpa"
        fast = dense_route.kernel_beats_sdpa(q, k, v, block_m=cfg.block_m, block_n=cfg.block_n,
                                             key_padding_mask=kpm, scale=scale, backend="triton")
        return "kernel" if fast else "sdpa"

    @staticmethod
    def _start_copy(entry: _ArmCacheEntry) -> None:
        """Start the device->host copy of the decisions (pinned memory, non-blocking) and mark its end."""
        buf = torch.empty(entry.patterns.shape, dtype=entry.patterns.dtype, pin_memory=True)
        buf.copy_(entry.patterns, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        entry.copy = (buf, event)

    @staticmethod
    def _read_host(entry: _ArmCacheEntry) -> np.ndarray:
        """The decisions on the host: the one device->host read of a call that needs them (kept with the ARM
        cache entry, so reused decisions are read once). Waits only for the copy started by ``_start_copy``."""
        if entry.host is None:
            if entry.copy is not None:
                buf, event = entry.copy
                event.synchronize()
                entry.host, entry.copy = buf.numpy().astype(np.int8), None
            else:
                entry.host = entry.patterns.cpu().numpy().astype(np.int8)
        return entry.host

    # ----------------------------------------------------------------- accounting
    def _record(self, plan, patterns, recalls, entry, valid, B, N, D) -> MethodRecord:
        """The call's record; its numbers are computed from the device decisions when the stats are read."""
        tensors = [patterns if entry.host is None else torch.from_numpy(entry.host)]
        if recalls is not None:
            tensors.append(recalls)
        if valid is not None:
            tensors.append(valid)

        def finish(arrays: list[np.ndarray]) -> dict[str, Any]:
            pats = arrays[0].astype(np.int64)
            rec = arrays[1].astype(np.float32) if recalls is not None else None
            n_valid = arrays[-1].astype(np.int64).tolist() if valid is not None else [N] * B
            return self._accounting(plan, pats, rec, n_valid, D)

        return deferred_record(tuple(tensors), finish, pattern_names=PATTERN_NAMES)

    @staticmethod
    def _accounting(plan, patterns, recalls, valid, head_dim) -> dict[str, Any]:
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
        return dict(head_patterns=patterns, computed=computed * head_dim, total=total * head_dim,
                    video_computed=vcomp * head_dim, video_total=vtot * head_dim, recalls=recalls,
                    pattern_video_pairs=per_pattern)
