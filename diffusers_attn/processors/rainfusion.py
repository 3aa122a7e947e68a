"""RainFusion-style training-free sparse attention for 3D video DiTs (this project's ``rf1`` definitions).

Per attention call, each head is assigned one pattern by the ARM recognizer (adaptive recognition module):

* **Spatial**: a query in latent frame t sees whole frames t' with |t' - t| <= w.
* **Temporal**: a query at row h sees rows |h' - h| <= r_h of every frame.
* **Textural**: a query sees a fixed 1/s^2 strided subsample of every frame.
* **Dense**: when no pattern keeps at least ``arm_threshold`` of the sampled attention mass.

Text tokens and the first latent frame are always dense (as rows and as columns). Spatial and temporal run as
block lists on :func:`diffusers_attn.kernels.block_sparse_attention` in natural token order ("relaxed" block
semantics: a query attends to every key of each listed block); textural gathers its keys and runs a dense kernel.
ARM probes ~``probe_budget`` of the call's FLOPs: exact fp32 softmax rows for a few strided queries, scoring how
much mass each pattern's *executed* mask keeps. See ``shared/specs/sparse-attention.md`` section 2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import (
    block_mask_to_lists,
    block_sparse_attention,
    block_sparse_attention_table,
    expand_block_mask,
    fast_kernel_unavailable,
    num_blocks,
    probe_block_mass,
    select_backend,
)
from ..layout import TokenLayout
from ..stats import PATTERN_NAMES
from .base import record_dense_fallback, valid_key_counts

if TYPE_CHECKING:
    from ..context import AttentionContext

logger = logging.getLogger(__name__)

DENSE, SPATIAL, TEMPORAL, TEXTURAL = 0, 1, 2, 3
_SPARSE_PATTERNS = {"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass
class RainFusionConfig:
    """Configuration of RainFusion sparse attention.

    Args:
        sparsity: Target share of video keys skipped, in [0, 1). Maps to each pattern's window so the nominal
            video-key density is about ``1 - sparsity`` (bandwidth ``b = 1 - sqrt(sparsity)``). ``0`` runs the
            stock attention unchanged.
        dense_steps: Dense warm-up: an ``int`` number of first denoising steps, or a ``float`` fraction in [0, 1]
            of the run (rounded half up). Fractions need the total step count: from the pipeline when
            ``apply_rainfusion`` gets one, else from ``num_inference_steps``.
        dense_tail_steps: The last steps that run dense (int count or float fraction), default none.
        dense_layers: Number of first attention layers that always run dense.
        skip_layers: Extra layer indices (in installation order) that always run dense.
        arm_threshold: A head uses its best pattern only if that pattern keeps at least this share of the sampled
            attention mass; otherwise it stays dense. ``0`` always takes the best pattern.
        probe_budget: ARM cost as a share of the call's attention FLOPs (probe rows = ceil(2 * budget * N)).
        probe_min_rows: Minimum number of probe rows.
        arm_refresh_steps: Re-run ARM every k sparse steps (1 = every step); in between, heads keep their pattern.
        patterns: Candidate patterns for ARM, a subset of ``("spatial", "temporal", "textural")``.
        force_pattern: Skip ARM and use this pattern for every head (``"spatial"``, ``"temporal"``,
            ``"textural"`` or ``"dense"``): for ablations and debugging.
        spatial_window: Override w (frames on each side) of the spatial pattern.
        temporal_rows: Override r_h (rows on each side) of the temporal pattern.
        textural_stride: Override the stride s of the textural pattern.
        min_video_tokens: Calls with fewer video tokens run dense (reason recorded). ``0`` disables the rule.
        block_m: Query block size of the block lists.
        block_n: Key block size of the block lists.
        num_inference_steps: Total steps, for fractional ``dense_steps`` when no pipeline is available.
        kernel_backend: Force a block-sparse kernel backend (``"torch"``, ``"triton"``); default automatic.
    """

    sparsity: float = 0.64
    dense_steps: int | float = 0.25
    dense_tail_steps: int | float = 0
    dense_layers: int = 1
    skip_layers: tuple[int, ...] = ()
    arm_threshold: float = 0.9
    probe_budget: float = 0.002
    probe_min_rows: int = 32
    arm_refresh_steps: int = 1
    patterns: tuple[str, ...] = ("spatial", "temporal", "textural")
    force_pattern: str | None = None
    spatial_window: int | None = None
    temporal_rows: int | None = None
    textural_stride: int | None = None
    min_video_tokens: int = 4096
    block_m: int = 128
    block_n: int = 64
    num_inference_steps: int | None = None
    kernel_backend: str | None = None

    def __post_init__(self) -> None:
        def err(msg: str) -> None:
            raise ValueError(f"RainFusionConfig: {msg}")

        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            err(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            err(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("dense_steps", "dense_tail_steps"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                err(f"{name} must be an int (steps) or a float fraction in [0, 1], got {val!r}")
            if isinstance(val, int) and val < 0:
                err(f"{name} must be >= 0, got {val}")
            if isinstance(val, float) and not 0.0 <= val <= 1.0:
                err(f"{name} as a float is a fraction of the run and must be in [0, 1], got {val}")
        for name in ("dense_layers", "probe_min_rows", "min_video_tokens"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                err(f"{name} must be an int >= 0, got {val!r}")
        if isinstance(self.arm_refresh_steps, bool) or not isinstance(self.arm_refresh_steps, int) or (
            self.arm_refresh_steps < 1
        ):
            err(f"arm_refresh_steps must be an int >= 1, got {self.arm_refresh_steps!r}")
        self.skip_layers = tuple(int(x) for x in self.skip_layers)
        if any(x < 0 for x in self.skip_layers):
            err(f"skip_layers must be non-negative layer indices, got {self.skip_layers}")
        if not 0.0 <= float(self.arm_threshold) <= 1.0:
            err(f"arm_threshold must be in [0, 1], got {self.arm_threshold}")
        if not 0.0 < float(self.probe_budget) <= 0.5:
            err(f"probe_budget must be in (0, 0.5], got {self.probe_budget}")
        self.patterns = tuple(self.patterns)
        bad = [p for p in self.patterns if p not in _SPARSE_PATTERNS]
        if bad or not self.patterns:
            err(f"patterns must be a non-empty subset of {tuple(_SPARSE_PATTERNS)}, got {self.patterns}")
        if self.force_pattern is not None and self.force_pattern not in PATTERN_NAMES:
            err(f"force_pattern must be one of {PATTERN_NAMES} or None, got {self.force_pattern!r}")
        for name, lo in (("spatial_window", 0), ("temporal_rows", 0), ("textural_stride", 1)):
            val = getattr(self, name)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < lo):
                err(f"{name} must be None or an int >= {lo}, got {val!r}")
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                err(f"{name} must be a positive int, got {val!r}")
        if self.num_inference_steps is not None and (
            not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1
        ):
            err(f"num_inference_steps must be None or a positive int, got {self.num_inference_steps!r}")
        if self.kernel_backend not in (None, "auto", "torch", "triton"):
            err(f"kernel_backend must be None, 'auto', 'torch' or 'triton', got {self.kernel_backend!r}")

    def steps_from(self, value: int | float, total: int | None, what: str) -> int:
        if isinstance(value, int):
            return value
        if value in (0.0,):
            return 0
        if total is None:
            raise ValueError(
                f"RainFusionConfig.{what}={value} is a fraction of the run, but the total number of steps is "
                "unknown: pass the pipeline to apply_rainfusion, set num_inference_steps, or give an int."
            )
        return _round_half_up(value * total)


@dataclass(frozen=True)
class PatternParams:
    """Pattern windows for one latent grid: spatial w (frames), temporal r_h (rows), textural stride s."""

    window: int
    rows: int
    stride: int


def pattern_params(config: RainFusionConfig, grid: tuple[int, int, int]) -> PatternParams:
    """Map ``sparsity`` to pattern windows (spec 2.4): b = 1 - sqrt(sparsity), w = round(b (T - 1)), ..."""
    T, H, _ = grid
    sigma = float(config.sparsity)
    b = 1.0 - math.sqrt(sigma)
    density = 1.0 - sigma
    w = config.spatial_window
    if w is None:
        w = min(max(_round_half_up(b * (T - 1)), 0), T - 1)
    r = config.temporal_rows
    if r is None:
        r = min(max(_round_half_up(b * (H - 1)), 0), H - 1)
    s = config.textural_stride
    if s is None:
        s = max(1, _round_half_up(1.0 / math.sqrt(density)))
    return PatternParams(window=int(w), rows=int(r), stride=int(s))


class RainFusionPlan:
    """Shape-only execution plan for one (layout, params, block sizes): block lists per pattern, the textural
    gather index, ARM probe rows and the per-pattern pair counts used for realized density.

    Built once per shape on CPU and cached; :meth:`on` returns device copies (cached per device).
    """

    def __init__(
        self,
        layout: TokenLayout,
        params: PatternParams,
        block_m: int,
        block_n: int,
        probe_budget: float,
        probe_min_rows: int,
    ) -> None:
        self.layout, self.params = layout, params
        self.block_m, self.block_n = block_m, block_n
        T, H, W = layout.grid
        HW, N = layout.frame_tokens, layout.seq_len
        M, K = num_blocks(N, block_m), num_blocks(N, block_n)
        self.num_m, self.num_k, self.n = M, K, N

        pos = torch.arange(N)
        rel = pos - layout.video_offset
        vid = (rel >= 0) & (rel < layout.num_video)
        t = torch.where(vid, rel // HW, -1)
        hh = torch.where(vid, (rel % HW) // W, -1)
        ww = torch.where(vid, rel % W, -1)
        txt = (pos >= layout.text_offset) & (pos < layout.text_offset + layout.text_len)
        dense_tok = (vid & (t == 0)) | txt
        s_tok = vid & (t >= 1)
        qb, kb = pos // block_m, pos // block_n

        q_dense = torch.zeros(M, dtype=torch.bool)
        q_dense[qb[dense_tok]] = True
        k_always = torch.zeros(K, dtype=torch.bool)
        k_always[kb[dense_tok]] = True

        def incidence(blocks: torch.Tensor, idx: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
            m = torch.zeros(n_rows, n_cols)
            m[blocks[s_tok], idx[s_tok]] = 1.0
            return m

        q_frames, k_frames = incidence(qb, t, M, T), incidence(kb, t, K, T)
        q_rows, k_rows = incidence(qb, hh, M, H), incidence(kb, hh, K, H)
        band_t = ((torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs() <= params.window).float()
        band_h = ((torch.arange(H)[:, None] - torch.arange(H)[None, :]).abs() <= params.rows).float()
        always = k_always[None, :] | q_dense[:, None]
        need_sp = ((((q_frames @ band_t) > 0).float() @ k_frames.T) > 0) | always
        need_tp = ((((q_rows @ band_h) > 0).float() @ k_rows.T) > 0) | always
        self.block_masks = {SPATIAL: need_sp, TEMPORAL: need_tp}
        self._q_dense = q_dense
        self.tables = {p: block_mask_to_lists(m) for p, m in self.block_masks.items()}

        strided = s_tok & (hh % params.stride == 0) & (ww % params.stride == 0)
        self.textural_keys = dense_tok | strided  # token-exact key set of S rows
        self.gather_index = self.textural_keys.nonzero().squeeze(-1)

        # ARM probe rows: evenly strided over S (spec 2.5).
        s0, s1 = layout.sparse_rows
        n_s = s1 - s0
        n_probe = min(max(math.ceil(2 * probe_budget * N), probe_min_rows), n_s)
        i = torch.arange(n_probe, dtype=torch.float64)
        self.probe_rows = (s0 + torch.floor((i + 0.5) * n_s / max(n_probe, 1))).long()
        self.probe_member = {p: m[self.probe_rows // block_m] for p, m in self.block_masks.items()}

        # Pair accounting (float64 numpy; shape-only, padding applied per call).
        self._rows_pb = np.bincount(qb.numpy(), minlength=M).astype(np.float64)
        self._vrows_pb = np.bincount(qb[vid].numpy(), minlength=M).astype(np.float64)
        self._keys_pb = np.bincount(kb.numpy(), minlength=K).astype(np.float64)
        vkeys_pb = np.bincount(kb[vid].numpy(), minlength=K).astype(np.float64)
        self._colw = {p: self._rows_pb @ m.numpy().astype(np.float64) for p, m in self.block_masks.items()}
        self._video_pairs = {
            p: float(self._vrows_pb @ m.numpy().astype(np.float64) @ vkeys_pb) for p, m in self.block_masks.items()
        }
        n_strided = int(strided.sum())
        self._video_pairs[TEXTURAL] = float(HW * layout.num_video + n_s * (HW + n_strided))
        self._video_pairs[DENSE] = float(layout.num_video) ** 2
        self.n_sparse_rows = n_s
        self.n_gather = int(self.gather_index.numel())
        self.density = {
            DENSE: 1.0,
            SPATIAL: float(self._colw[SPATIAL] @ self._keys_pb) / (N * N),
            TEMPORAL: float(self._colw[TEMPORAL] @ self._keys_pb) / (N * N),
            TEXTURAL: (float(N - n_s) * N + n_s * self.n_gather) / (N * N),
        }
        self._device_cache: dict[torch.device, dict[str, Any]] = {}
        self._pairs_cache: dict[tuple[int, int], tuple[float, float]] = {}

    def pattern_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact per-pattern lists ``[4, M, K_max]`` / ``[4, M]`` indexed by pattern id: dense (all blocks),
        spatial, temporal, and for textural heads only the always-dense query blocks (their other rows take the
        gather path)."""
        full = torch.ones(self.num_m, self.num_k, dtype=torch.bool)
        rows_only = self._q_dense[:, None].expand(self.num_m, self.num_k)
        masks = torch.stack([full, self.block_masks[SPATIAL], self.block_masks[TEMPORAL], rows_only])
        return block_mask_to_lists(masks)

    def on(self, device: torch.device) -> dict[str, Any]:
        """Device copies of the tensors the hot path needs."""
        d = self._device_cache.get(device)
        if d is None:
            d = {
                "tables": {p: (i.to(device), c.to(device)) for p, (i, c) in self.tables.items()},
                "gather_index": self.gather_index.to(device),
                "probe_rows": self.probe_rows.to(device),
                "probe_member_stack": torch.stack(
                    [self.probe_member[SPATIAL], self.probe_member[TEMPORAL]]
                ).to(device=device, dtype=torch.float32),
                "textural_keys": self.textural_keys.to(device=device, dtype=torch.float32),
            }
            if device.type == "cuda":
                d["pattern_tables"] = tuple(t.to(device) for t in self.pattern_tables())
            self._device_cache[device] = d
        return d

    def pairs(self, pattern: int, padded_text: int) -> tuple[float, float]:
        """(computed, total) (q, k) pairs of one head for ``pattern`` with ``padded_text`` padded text keys."""
        key = (pattern, padded_text)
        hit = self._pairs_cache.get(key)
        if hit is not None:
            return hit
        L, N = self.layout, self.n
        n_k_valid = N - padded_text
        total = float(N) * n_k_valid
        if pattern == DENSE:
            computed = total
        elif pattern == TEXTURAL:
            computed = float(N - self.n_sparse_rows) * n_k_valid + float(self.n_sparse_rows) * (
                self.n_gather - padded_text
            )
        else:
            keys = self._keys_pb.copy()
            if padded_text:
                pad_pos = np.arange(L.text_offset + L.text_len - padded_text, L.text_offset + L.text_len)
                keys -= np.bincount(pad_pos // self.block_n, minlength=self.num_k)
            computed = float(self._colw[pattern] @ keys)
        self._pairs_cache[key] = (computed, total)
        return computed, total

    def video_pairs(self, pattern: int) -> float:
        return self._video_pairs[pattern]

    def token_mask(self, pattern: int) -> torch.Tensor:
        """The (N, N) boolean mask this plan executes for ``pattern`` (for tests and oracles; O(N^2))."""
        N = self.n
        if pattern == DENSE:
            return torch.ones(N, N, dtype=torch.bool)
        if pattern == TEXTURAL:
            mask = torch.ones(N, N, dtype=torch.bool)
            s0, s1 = self.layout.sparse_rows
            mask[s0:s1] = self.textural_keys[None, :]
            return mask
        return expand_block_mask(self.block_masks[pattern], N, N, self.block_m, self.block_n)


@dataclass
class _ArmCacheEntry:
    step: int
    key: tuple
    patterns: np.ndarray
    recalls: np.ndarray | None


class RainFusionMethod:
    """The RainFusion attention method; one instance is shared by all layers of a transformer."""

    name = "rainfusion"

    def __init__(self, config: RainFusionConfig | None = None) -> None:
        self.config = config or RainFusionConfig()
        self._plans: dict[tuple, RainFusionPlan] = {}
        self._arm_cache: dict[tuple[int, int], _ArmCacheEntry] = {}
        self._warned: set[str] = set()

    # ----------------------------------------------------------------- schedule
    def fallback_reason(self, layout: TokenLayout, layer_index: int, context: "AttentionContext") -> str | None:
        """Why this call must run dense, or None when it may be sparse."""
        cfg = self.config
        if cfg.sparsity == 0:
            return "sparsity=0"
        if layer_index < cfg.dense_layers:
            return "dense layer (dense_layers)"
        if layer_index in cfg.skip_layers:
            return "dense layer (skip_layers)"
        total = context.num_steps
        step = context.step
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

    def plan(self, layout: TokenLayout) -> RainFusionPlan:
        cfg = self.config
        params = pattern_params(cfg, layout.grid)
        key = (layout, params, cfg.block_m, cfg.block_n, cfg.probe_budget, cfg.probe_min_rows)
        plan = self._plans.get(key)
        if plan is None:
            plan = RainFusionPlan(layout, params, cfg.block_m, cfg.block_n, cfg.probe_budget, cfg.probe_min_rows)
            self._plans[key] = plan
        return plan

    # ----------------------------------------------------------------- call
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
        layer_index: int,
        context: "AttentionContext",
        dense_fn: Callable[[], torch.Tensor],
        head_offset: int = 0,
        total_heads: int | None = None,
    ) -> torch.Tensor:
        """Attention for heads ``[head_offset, head_offset + H)`` of ``total_heads`` (context parallelism gives a
        rank a slice of the heads over the whole sequence; per-head state uses global ids)."""
        B, H, N, D = q.shape
        if N != layout.seq_len or k.shape[2] != N:
            raise ValueError(
                f"RainFusion: sequence length {N} (keys {k.shape[2]}) does not match the layout "
                f"{layout} (expected {layout.seq_len}); the latent grid from the context hook disagrees with the "
                "attention inputs"
            )
        reason = self.fallback_reason(layout, layer_index, context)
        if reason is not None:
            valid = valid_key_counts(key_padding_mask, B, N) if key_padding_mask is not None else [N] * B
            record_dense_fallback(
                context, layer_index, reason, batch=B, heads=H, head_dim=D, n_q=N,
                n_k_valid=float(sum(valid)), n_video=layout.num_video, head_offset=head_offset,
                total_heads=total_heads,
            )
            return dense_fn()

        timers, dev = context.stats.timers, q.device
        with timers.time("plan", dev):
            plan = self.plan(layout)
            dplan = plan.on(dev)
        patterns, recalls, valid = self._decide(q, k, plan, dplan, key_padding_mask, scale, layer_index, context)

        from ..context import Decision

        context.last_decisions[layer_index] = Decision(context.step, patterns, recalls, layout, plan.params,
                                                       head_offset)
        self._record(context, layer_index, plan, patterns, recalls, valid, D, head_offset, total_heads)
        if (patterns == DENSE).all():
            # Every head stays dense: the stock call is the fastest exact dense path.
            with timers.time("attention", dev):
                return dense_fn()
        with timers.time("attention", dev):
            return self._execute(q, k, v, patterns, plan, dplan, key_padding_mask, scale, context)

    # ----------------------------------------------------------------- ARM
    def _decide(self, q, k, plan, dplan, kpm, scale, layer_index, context):
        cfg = self.config
        B, H, N, _ = q.shape
        valid = valid_key_counts(kpm, B, N)
        if cfg.force_pattern is not None:
            pid = {"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}[cfg.force_pattern]
            if pid == TEXTURAL and plan.params.stride == 1:
                pid = DENSE
            return np.full((B, H), pid, dtype=np.int8), None, valid

        cache_key = (layer_index, context.call_in_step)
        shape_key = (plan.layout, plan.params, B, H)
        if cfg.arm_refresh_steps > 1:
            hit = self._arm_cache.get(cache_key)
            if hit is not None and hit.key == shape_key and 0 <= context.step - hit.step < cfg.arm_refresh_steps:
                return hit.patterns, hit.recalls, valid

        with context.stats.timers.time("arm", q.device):
            recalls = arm_recalls(q, k, plan, dplan, kpm, scale, backend=cfg.kernel_backend)  # (B, H, 3)
            candidates = [_SPARSE_PATTERNS[p] for p in cfg.patterns]
            patterns = choose_patterns(recalls, plan, candidates, cfg.arm_threshold)
            packed = torch.cat([patterns.float().unsqueeze(-1), recalls], dim=-1).cpu().numpy()
        patterns_np = packed[..., 0].astype(np.int8)
        recalls_np = packed[..., 1:].astype(np.float32)
        if cfg.arm_refresh_steps > 1:
            self._arm_cache[cache_key] = _ArmCacheEntry(context.step, shape_key, patterns_np, recalls_np)
        return patterns_np, recalls_np, valid

    # ----------------------------------------------------------------- execution
    def _execute(self, q, k, v, patterns, plan, dplan, kpm, scale, context):
        cfg, timers = self.config, context.stats.timers
        backend = select_backend(q, k, v, cfg.block_m, cfg.block_n, cfg.kernel_backend)
        context.stats.kernel_calls[backend] += 1
        if q.is_cuda and backend != "triton":
            # Exact but slow on a GPU: say so once, and count it in stats.
            reason = fast_kernel_unavailable(q, k, v, cfg.block_m, cfg.block_n) or f"kernel_backend={backend!r}"
            context.stats.slow_path[reason] += 1
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning("diffusers-attn: RainFusion runs its sparse calls on the PyTorch path on %s: %s",
                               q.device, reason)
        if backend == "triton":
            return self._execute_tables(q, k, v, patterns, plan, dplan, kpm, scale, timers)
        return self._execute_grouped(q, k, v, patterns, plan, dplan, kpm, scale, timers)

    def _execute_tables(self, q, k, v, patterns, plan, dplan, kpm, scale, timers):
        """One kernel launch for every head (compact per-pattern tables), then the textural heads' sparse rows
        through the gather path. Pattern ids index the tables directly."""
        cfg = self.config
        tables = dplan.get("pattern_tables")
        if tables is None:
            tables = dplan["pattern_tables"] = tuple(t.to(q.device) for t in plan.pattern_tables())
        head_table = torch.as_tensor(patterns, dtype=torch.int32).to(q.device, non_blocking=True)
        out = block_sparse_attention_table(
            q, k, v, tables[0], tables[1], head_table, block_m=cfg.block_m, block_n=cfg.block_n,
            key_padding_mask=kpm, scale=scale, backend="triton",
        )
        if (patterns == TEXTURAL).any():
            gi = dplan["gather_index"]
            s0, s1 = plan.layout.sparse_rows
            for b in range(q.shape[0]):
                heads = np.nonzero(patterns[b] == TEXTURAL)[0]
                if not len(heads):
                    continue
                hs = torch.as_tensor(heads, device=q.device)
                with timers.time("gather", q.device):
                    kc = k[b].index_select(0, hs).index_select(1, gi).unsqueeze(0)
                    vc = v[b].index_select(0, hs).index_select(1, gi).unsqueeze(0)
                    kpm_c = kpm[b : b + 1].index_select(1, gi) if kpm is not None else None
                qs = q[b].index_select(0, hs)[:, s0:s1].unsqueeze(0)
                if kpm_c is None:
                    o = _sdpa(qs, kc, vc, None, scale)
                else:  # a boolean mask would push SDPA off its flash backend; the kernel masks for free
                    o = _dense_triton(qs, kc, vc, kpm_c, scale, cfg.block_m, cfg.block_n)
                out[b, hs, s0:s1] = o[0]
        return out

    def _execute_grouped(self, q, k, v, patterns, plan, dplan, kpm, scale, timers):
        """Heads grouped by pattern, one call per group (the right shape for the PyTorch path)."""
        cfg = self.config
        B, H, N, _ = q.shape
        out = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(B, H, N, v.shape[-1])
        for b in range(B):
            kpm_b = kpm[b : b + 1] if kpm is not None else None
            for p in np.unique(patterns[b]):
                heads = np.nonzero(patterns[b] == p)[0]
                if heads[-1] - heads[0] + 1 == len(heads):  # contiguous: use views, no copies
                    sel: Any = slice(int(heads[0]), int(heads[-1]) + 1)
                    qs, ks, vs = q[b : b + 1, sel], k[b : b + 1, sel], v[b : b + 1, sel]
                else:
                    sel = torch.as_tensor(heads, device=q.device)
                    qs, ks, vs = (x[b].index_select(0, sel).unsqueeze(0) for x in (q, k, v))
                nh = len(heads)
                if p == DENSE:
                    o = _sdpa(qs, ks, vs, kpm_b, scale)
                elif p == TEXTURAL:
                    o = self._textural(qs, ks, vs, plan, dplan, kpm_b, scale, timers)
                else:
                    idx, cnt = dplan["tables"][int(p)]
                    o = block_sparse_attention(
                        qs, ks, vs,
                        idx.expand(1, nh, *idx.shape), cnt.expand(1, nh, *cnt.shape),
                        block_m=cfg.block_m, block_n=cfg.block_n, key_padding_mask=kpm_b, scale=scale,
                        backend=cfg.kernel_backend,
                    )
                if isinstance(sel, slice):
                    out[b, sel] = o[0]
                else:
                    out[b].index_copy_(0, sel, o[0])
        return out

    def _textural(self, qs, ks, vs, plan, dplan, kpm_b, scale, timers):
        o = torch.empty(*qs.shape[:3], vs.shape[-1], dtype=qs.dtype, device=qs.device)
        for r0, r1 in plan.layout.dense_row_ranges:
            o[:, :, r0:r1] = _sdpa(qs[:, :, r0:r1], ks, vs, kpm_b, scale)
        gi = dplan["gather_index"]
        with timers.time("gather", qs.device):
            kc, vc = ks.index_select(2, gi), vs.index_select(2, gi)
            kpm_c = kpm_b.index_select(1, gi) if kpm_b is not None else None
        s0, s1 = plan.layout.sparse_rows
        o[:, :, s0:s1] = _sdpa(qs[:, :, s0:s1], kc, vc, kpm_c, scale)
        return o

    # ----------------------------------------------------------------- stats
    def _record(self, context, layer_index, plan, patterns, recalls, valid, head_dim, head_offset=0,
                total_heads=None):
        B, H = patterns.shape
        computed = total = vcomp = 0.0
        for b in range(B):
            # Padding is text padding in the supported models; execution is exact either way, only the
            # accounting assumes it sits in the text tail.
            padded = min(plan.n - valid[b], plan.layout.text_len)
            for p in np.unique(patterns[b]):
                nh = int((patterns[b] == p).sum())
                c, t = plan.pairs(int(p), padded)
                computed += c * nh
                total += t * nh
                vcomp += plan.video_pairs(int(p)) * nh
        vtot = float(plan.layout.num_video) ** 2 * B * H
        context.stats.record(
            layer_index,
            head_patterns=patterns.astype(np.int64),
            computed=computed * head_dim,
            total=total * head_dim,
            video_computed=vcomp * head_dim,
            video_total=vtot * head_dim,
            recalls=recalls,
            head_offset=head_offset,
            total_heads=total_heads,
        )


def _dense_triton(q, k, v, kpm, scale, block_m, block_n):
    """Dense attention with a key padding mask through the block-sparse kernel (every key block listed)."""
    M, K = num_blocks(q.shape[2], block_m), num_blocks(k.shape[2], block_n)
    idx = torch.arange(K, dtype=torch.int32, device=q.device).expand(q.shape[0], q.shape[1], M, K)
    cnt = torch.full((1, 1, 1), K, dtype=torch.int32, device=q.device).expand(q.shape[0], q.shape[1], M)
    return block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n, key_padding_mask=kpm,
                                  scale=scale, backend="triton")


def _sdpa(q, k, v, kpm, scale):
    mask = kpm[:, None, None, :] if kpm is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def arm_recalls(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: RainFusionPlan,
    dplan: dict[str, Any],
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    backend: str | None = None,
) -> torch.Tensor:
    """ARM recall of each pattern per (batch, head): (B, H, 3) for (spatial, temporal, textural), fp32.

    For each probe row, an exact softmax (fp32 accumulation) over all valid keys; the recall of a pattern is the
    mean probability mass inside the mask that pattern will execute (block-expanded for spatial/temporal,
    token-exact textural). The masses come from :func:`diffusers_attn.kernels.probe_block_mass` (a Triton kernel
    on CUDA that never materialises the (H, P, N) scores).
    """
    rows = dplan["probe_rows"]
    mass, tex = probe_block_mass(
        q.index_select(2, rows), k, block_n=plan.block_n, key_padding_mask=key_padding_mask, scale=scale,
        token_weights=dplan["textural_keys"], backend=backend,
    )  # (B, H, P, K), (B, H, P)
    members = dplan["probe_member_stack"]  # (2, P, K): spatial, temporal
    block_rec = torch.einsum("bhpk,cpk->bhc", mass, members) / rows.numel()
    return torch.cat([block_rec, tex.mean(-1, keepdim=True)], dim=-1)


def choose_patterns(
    recalls: torch.Tensor, plan: RainFusionPlan, candidates: list[int], threshold: float
) -> torch.Tensor:
    """Pattern id per (batch, head) from ARM recalls (spec 2.5): argmax recall over candidate patterns, ties to
    the lower plan density then the order spatial, temporal, textural; dense if the best recall < threshold.

    Degenerate patterns (whose plan is dense anyway, e.g. stride 1) are not candidates.
    """
    order = sorted(
        (p for p in candidates if plan.density[p] < 1.0 - 1e-9 and not (p == TEXTURAL and plan.params.stride == 1)),
        key=lambda p: (plan.density[p], p),
    )
    B, H, _ = recalls.shape
    if not order:
        return torch.zeros(B, H, dtype=torch.int8, device=recalls.device)
    cols = torch.as_tensor([p - 1 for p in order], device=recalls.device)
    r = recalls.index_select(-1, cols)
    arg = r.argmax(dim=-1)  # argmax returns the first maximum: the lowest density among ties
    best = r.gather(-1, arg.unsqueeze(-1)).squeeze(-1)
    ids = torch.as_tensor(order, device=recalls.device)[arg]
    ids = torch.where(best >= threshold, ids, torch.zeros_like(ids))
    return ids.to(torch.int8)


def apply_rainfusion(pipe_or_model: Any, config: RainFusionConfig | None = None) -> "AttentionContext":
    """Install RainFusion sparse attention on a CogVideoX or HunyuanVideo pipeline (or bare transformer).

    Example::

        pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
        apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0.25, dense_layers=1))
        video = pipe(prompt, num_frames=49).frames[0]
        print(get_attention_stats(pipe))
        remove_attention_acceleration(pipe)

    Applying again replaces the previous configuration. Returns the transformer's :class:`AttentionContext`.
    """
    from ..adapters import get_adapter
    from ..install import install_method, resolve_transformer

    config = config if config is not None else RainFusionConfig()
    if not isinstance(config, RainFusionConfig):
        raise TypeError(f"config must be a RainFusionConfig, got {type(config).__name__}")
    transformer, pipe = resolve_transformer(pipe_or_model)
    get_adapter(transformer)  # unsupported model: say so before anything else
    if pipe is None and config.num_inference_steps is None:
        for name in ("dense_steps", "dense_tail_steps"):
            val = getattr(config, name)
            if isinstance(val, float) and val > 0:
                raise ValueError(
                    f"RainFusionConfig.{name}={val} is a fraction of the run, but a bare transformer does not know "
                    "the number of steps: pass the pipeline, set num_inference_steps, or give an int step count."
                )
    return install_method(pipe_or_model, RainFusionMethod(config), num_inference_steps=config.num_inference_steps)
