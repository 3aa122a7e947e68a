"""Random-block baseline for RainFusion ablations: rf2's forced regions, uniformly random key blocks elsewhere.

What structure buys is measured against this: at the same executed video x video density, a method whose key
blocks carry no information about the content. Per call (the RainFusion schedule of the config: ``dense_steps``,
``dense_layers``, ``min_video_tokens`` ... run dense as usual):

1. Forced regions exactly as rf2 (:class:`~diffusers_attn.methods.rainfusion.rf2.RF2Plan`): text rows and columns
   dense; the first latent frame per ``rf2_first_frame`` ("sink": its keys kept for every query).
2. Every other query block keeps ``counts[m]`` key blocks drawn uniformly without replacement from its candidate
   (non-forced) key blocks, independently per (batch, head, query block). The counts are the same for every
   head; they are set once per layout so that the expected executed video density equals ``target_density``
   (k or k + 1 blocks per row, the k + 1 rows spread over the sequence); the realized density is exact in the
   record and within one key block per query block of the target. A target below the forced part's density runs
   the forced part alone (the record's info says so).
3. The draws are seeded by ``(seed, layer, step, call in step, head offset)``: reruns are reproducible and do not
   depend on the order of the calls.

Execution is :func:`diffusers_attn.kernels.block_sparse_attention` (relaxed block semantics, exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...kernels import block_sparse_attention, select_backend
from ...layout import TokenLayout
from ..base import CallInfo, MethodRecord, deferred_record
from .config import RainFusionConfig
from .method import RainFusionMethod
from .rf2 import RF2Plan, block_lists, pair_counts

#: Pattern names of the baseline's records ("dense" only names fallback calls).
RANDOM_PATTERN_NAMES = ("dense", "random")


class RandomBlockPlan:
    """Shape-only part of the baseline for one (layout, block sizes, target, first-frame rule): rf2's forced
    regions and the per-query-block counts of random key blocks."""

    def __init__(self, layout: TokenLayout, block_m: int, block_n: int, target_density: float,
                 first_frame: str) -> None:
        base = RF2Plan(layout, block_m, block_n, 1.0 - target_density, first_frame)
        self.base, self.layout, self.target = base, layout, float(target_density)
        self.forced, self.candidates = base.forced, base.candidates
        self.forced_density = base.forced_density
        forced_rows, forced_cols = base.forced.all(1), base.forced.all(0)
        nv2 = float(layout.num_video) ** 2
        counts = torch.zeros(base.num_m, dtype=torch.long)
        free = torch.nonzero(~forced_rows).flatten()
        cand_sizes = base.vkeys_pb[~forced_cols]
        left = (self.target - self.forced_density) * nv2  # video pairs the random blocks must add
        if left > 0 and free.numel() and cand_sizes.numel():
            size = float(cand_sizes.mean())  # expected video keys of a uniformly drawn candidate block
            row_pairs = base.vrows_pb[free] * size  # expected video pairs of one more block in each free row
            k = min(math.floor(left / float(row_pairs.sum()) + 1e-9), cand_sizes.numel())
            counts[free] = k
            rem = left - k * float(row_pairs.sum())
            if k < cand_sizes.numel():
                # One more block in the rows that round the remainder best, spread evenly over the sequence
                # (a golden-ratio sequence) so that no region gets all of them.
                spread = np.argsort((np.arange(free.numel()) * 0.6180339887498949) % 1.0, kind="stable")
                for i in spread:
                    if rem < float(row_pairs[i]) / 2:
                        continue
                    counts[free[i]] += 1
                    rem -= float(row_pairs[i])
        self.counts = counts  # (M,) random key blocks per query block (0 for forced rows)
        self.expected_density = self.forced_density + float(
            (counts.double() * base.vrows_pb).sum() * (float(cand_sizes.mean()) if cand_sizes.numel() else 0.0)
        ) / nv2
        self.k_max = max(1, base.num_k if bool(forced_rows.any()) else int(forced_cols.sum()) + int(counts.max()))
        self._device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        d = self._device.get(device)
        if d is None:
            d = self._device[device] = {**self.base.on(device), "counts": self.counts.to(device)}
        return d


class RandomBlockDecision:
    """The last selection of a layer: ``sel`` (B, H, M, K) bool, the executed block mask; ``density`` (B, H) its
    executed video x video density (read from the device on first access)."""

    def __init__(self, step: int, sel: torch.Tensor, stats: torch.Tensor, nv2: float, target: float) -> None:
        self.step, self.sel, self.target = step, sel, target
        self._stats, self._nv2 = stats, nv2

    @property
    def density(self) -> np.ndarray:
        return self._stats[..., 1].cpu().numpy() / self._nv2


def draw_seed(seed: int, call: CallInfo) -> int:
    """The generator seed of one call's draws (independent of the order of the calls)."""
    ss = np.random.SeedSequence([seed, call.layer_index, call.step, call.call_in_step, call.head_offset])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def select_random_blocks(plan: RandomBlockPlan, dplan: dict[str, torch.Tensor], batch: int, heads: int,
                         k_valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Executed block mask (B, H, M, K) bool: forced regions plus ``counts[m]`` uniformly random candidate key
    blocks per (batch, head, query block); fully padded key blocks are never listed. Draws on the CPU generator."""
    M, K = plan.forced.shape
    dev = dplan["forced"].device
    has_keys = (k_valid > 0)[:, None, None, :]
    cand = dplan["candidates"] & has_keys
    scores = torch.rand(batch, heads, M, K, generator=generator).to(dev)
    scores = torch.where(cand, scores, -1.0)  # non-candidates rank last
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(K, device=dev).expand_as(order))
    picked = (rank < dplan["counts"][:, None]) & cand
    return (dplan["forced"] & has_keys) | picked


class RandomBlockMethod(RainFusionMethod):
    """The random-block baseline (see the module docstring). ``config`` gives the schedule, block sizes and
    ``rf2_first_frame``; its ``sparsity`` only decides whether the run is sparse at all (0: dense).
    ``target_density``: executed video x video density of each sparse call, in (0, 1]."""

    name = "random_blocks"

    def __init__(self, config: RainFusionConfig, target_density: float, seed: int = 0) -> None:
        if not 0.0 < float(target_density) <= 1.0:
            raise ValueError(f"RandomBlockMethod: target_density must be in (0, 1], got {target_density}")
        super().__init__(config)
        self.target_density, self.seed = float(target_density), int(seed)
        self._rb_plans: dict[tuple, RandomBlockPlan] = {}

    def random_plan(self, layout: TokenLayout) -> RandomBlockPlan:
        cfg = self.config
        key = (layout, cfg.block_m, cfg.block_n, self.target_density, cfg.rf2_first_frame)
        plan = self._rb_plans.get(key)
        if plan is None:
            plan = self._rb_plans[key] = RandomBlockPlan(layout, cfg.block_m, cfg.block_n, self.target_density,
                                                         cfg.rf2_first_frame)
        return plan

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
        dense = self._checked_or_dense(q, k, layout, key_padding_mask, call, dense_fn, RANDOM_PATTERN_NAMES,
                                       "RandomBlockMethod")
        if dense is not None:
            return dense
        B, H, N, D = q.shape
        plan = self.random_plan(layout)
        dplan = plan.on(q.device)
        bn = plan.base.block_n
        if key_padding_mask is None:
            k_valid = dplan["keys_pb"].expand(B, -1)
        else:  # valid keys per key block (a fully padded block is never listed)
            k_valid = torch.zeros(B, plan.base.num_k, dtype=torch.float64, device=q.device).index_add_(
                1, torch.arange(N, device=q.device) // bn, key_padding_mask.to(torch.float64))
        gen = torch.Generator().manual_seed(draw_seed(self.seed, call))
        sel = select_random_blocks(plan, dplan, B, H, k_valid, gen)
        lists = block_lists(sel, plan.k_max)
        cfg = self.config
        backend = select_backend(q, k, v, cfg.block_m, cfg.block_n, cfg.kernel_backend)
        out = block_sparse_attention(q, k, v, *lists, block_m=cfg.block_m, block_n=cfg.block_n,
                                     key_padding_mask=key_padding_mask, scale=scale, backend=backend)
        stats = pair_counts(sel, dplan, k_valid)  # (B, H, 2): computed pairs, video pairs
        n_valid = k_valid.sum(-1)
        nv2 = float(layout.num_video) ** 2

        def finish(arrays: list[np.ndarray]) -> dict[str, Any]:
            st, nk = arrays
            return {"head_patterns": np.ones((B, H), dtype=np.int64), "computed": float(st[..., 0].sum()) * D,
                    "total": float(N) * float(nk.sum()) * H * D, "video_computed": float(st[..., 1].sum()) * D,
                    "video_total": nv2 * B * H * D}

        info: dict[str, Any] = {"random_blocks_target_density": self.target_density}
        if plan.forced_density > self.target_density + 1e-12:
            info["random_blocks_target_unmet"] = (f"forced regions cost {plan.forced_density:.3f} of the video "
                                                  f"pairs, above the target {self.target_density:.3f}")
        record = deferred_record((stats, n_valid), finish, pattern_names=RANDOM_PATTERN_NAMES, kernel=backend,
                                 info=info)
        record.decision = RandomBlockDecision(call.step, sel, stats, nv2, self.target_density)
        return out, record
