"""RainFusion 2.0 (``RainFusionConfig(mode="rf2")``): online block top-k instead of ARM's fixed patterns.

Per call and head (RainFusion 2.0, arXiv 2512.24086, https://arxiv.org/abs/2512.24086; public implementations: MindIE-SD
``mindiesd/layers/flash_attn/sparse_flash_attn_rf_v2.py`` and LightX2V ``lightx2v/common/ops/attn/rainfusion_attn.py``):

1. Mean-pool q over blocks of ``block_m`` queries and k over blocks of ``block_n`` keys, in sequence order
   (padded keys excluded; a fully padded key block is never selected).
2. Block scores ``q_hat @ k_hat.T * scale + log(valid keys of the block)``: the log term makes the softmax over
   key blocks an estimate of each block's attention mass (a constant for full blocks: the ranking is the plain one).
3. Forced regions: text rows and columns are dense; the first latent frame follows ``rf2_first_frame``
   ("sink": its keys are kept for every query; "dense": rows and columns; "none"). Their cost is charged to the
   budget ``(1 - sparsity)`` of video x video pairs; every other query block keeps the top ``k`` of its remaining
   key blocks, ``k`` the largest count that stays within the budget (so the executed density is at most one key
   block per query block below it). When the forced part alone exceeds the budget only it is kept, and the record
   says so.

Ties in the top-k go to the lower key block index; non-finite scores are never picked. Tokens are located only
through ``TokenLayout.token_coords()`` (a token permutation changes no code here). Selection runs without autograd:
on the Triton path (CUDA) as :func:`diffusers_attn.kernels.block_topk_select` (three kernel launches, same lists
as the PyTorch path), else with the PyTorch ops below; execution is
:func:`diffusers_attn.kernels.block_sparse_attention` (relaxed block semantics, exact). Optional reuse of a
layer's lists for ``rf2_reuse_steps`` steps, or of one layer's lists for all layers of a step
(``rf2_share_layers``), as LightX2V and xLLM do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ...kernels import (
    block_sparse_attention,
    block_topk_select,
    fast_kernel_unavailable,
    key_blocks,
    num_blocks,
    select_backend,
    selection_backend,
)
from ...kernels.block_select import topk_lower_index
from ...kernels.memo import TensorMemo
from ...kernels.selfcheck import stats_info as kernel_check_info
from ...layout import TokenLayout
from ..base import CallInfo, MethodRecord, deferred_record, valid_key_counts

logger = logging.getLogger(__name__)

#: Pattern names of rf2 records: a sparse call counts every head as "rf2"; "dense" only names fallback calls.
RF2_PATTERN_NAMES = ("dense", "rf2")
RF2 = 1


class RF2Plan:
    """Shape-only part of rf2 for one (layout, block sizes, sparsity, first-frame rule): forced regions, block
    token counts, the per-row top-k count and the list width. Built on CPU, cached; :meth:`on` gives device copies."""

    def __init__(self, layout: TokenLayout, block_m: int, block_n: int, sparsity: float, first_frame: str) -> None:
        self.layout, self.block_m, self.block_n = layout, block_m, block_n
        N = layout.seq_len
        M, K = num_blocks(N, block_m), num_blocks(N, block_n)
        self.num_m, self.num_k, self.n = M, K, N
        t, _, _, txt = layout.token_coords()
        vid = t >= 0
        first = vid & (t == 0)
        pos = torch.arange(N)
        qb, kb = pos // block_m, pos // block_n
        row_tok = txt | first if first_frame == "dense" else txt
        col_tok = txt | first if first_frame in ("sink", "dense") else txt
        forced_rows = torch.zeros(M, dtype=torch.bool)
        forced_rows[qb[row_tok]] = True
        forced_cols = torch.zeros(K, dtype=torch.bool)
        forced_cols[kb[col_tok]] = True
        self.forced = forced_rows[:, None] | forced_cols[None, :]  # (M, K)
        self.candidates = ~self.forced

        f64 = torch.float64
        self.rows_pb = torch.bincount(qb, minlength=M).to(f64)
        self.vrows_pb = torch.bincount(qb[vid], minlength=M).to(f64)
        self.keys_pb = torch.bincount(kb, minlength=K).to(f64)
        self.vkeys_pb = torch.bincount(kb[vid], minlength=K).to(f64)
        nv2 = float(layout.num_video) ** 2
        self.budget = 1.0 - float(sparsity)
        self.forced_density = float(self.vrows_pb @ self.forced.to(f64) @ self.vkeys_pb) / nv2
        self.budget_met = self.forced_density <= self.budget + 1e-12

        # Uniform k over the free query blocks, priced at the largest candidate block: the executed density never
        # exceeds the budget and falls short by less than one key block per query block.
        free_rows = float(self.vrows_pb[~forced_rows].sum())
        cand_sizes = self.vkeys_pb[~forced_cols]
        left = (self.budget - self.forced_density) * nv2
        k = 0
        if left > 0 and free_rows > 0 and cand_sizes.numel():
            k = min(math.floor(left / (free_rows * float(cand_sizes.max())) + 1e-9), cand_sizes.numel())
        self.blocks_per_row = k
        self.k_max = max(1, K if bool(forced_rows.any()) else int(forced_cols.sum()) + k)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._call_cache: dict[tuple, dict[str, Any]] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        d = self._device_cache.get(device)
        if d is None:
            names = ("forced", "candidates", "rows_pb", "vrows_pb", "keys_pb", "vkeys_pb")
            d = self._device_cache[device] = {n: getattr(self, n).to(device) for n in names}
            # block_topk_select's arguments: statistics (computed pairs, video pairs, kept mass over video queries)
            rows = torch.stack([self.rows_pb, self.vrows_pb, self.vrows_pb / float(self.layout.num_video)], -1)
            d["row_weights"] = rows.to(device)
            d["col_weights"] = self.vkeys_pb.to(torch.float32).to(device)
            d["forced_u8"] = self.forced.to(torch.uint8).to(device)
        return d

    def call_constants(self, device: torch.device, batch: int, heads: int, acc: torch.dtype) -> dict[str, Any]:
        """Everything a selection call needs that depends only on the shape (cached per device, batch, heads and
        accumulation dtype), built with the same device ops a call used to run, so the values are the same bits."""
        key = (device, batch, heads, acc)
        c = self._call_cache.get(key)
        if c is None:
            d, B, H, K = self.on(device), batch, heads, self.num_k
            keys = d["keys_pb"].to(acc)
            f32 = torch.float32
            c = self._call_cache[key] = {
                "rows": d["rows_pb"].to(acc)[:, None],  # (M, 1): queries per block
                "keys_div": keys.clamp_min(1)[:, None],  # (K, 1): keys per block (no padding)
                "log_keys": keys.log(),  # (K,)
                "k_valid": keys[:, None].expand(B, -1, -1),  # (B, K, 1)
                "n_k_valid": keys.sum(-1, dtype=torch.float64).expand(B, H, 1),
                "zero": torch.zeros((), dtype=acc, device=device),
                "list_keys": _list_keys(K, device),
                # pair counts: per key block (valid keys, video keys) in fp32, per query block (rows, video rows)
                "pair_keys": torch.stack([d["keys_pb"], d["vkeys_pb"]], -1).to(f32).expand(B, -1, -1),
                "vkeys_col": d["vkeys_pb"].to(f32)[:, None].expand(B, -1, -1),  # (B, K, 1)
                "pair_rows": torch.stack([d["rows_pb"], d["vrows_pb"]], -1),  # (M, 2) fp64
                "key_block": (torch.arange(self.n, device=device) // self.block_n),  # (N,) block of each key
                "no_keys": torch.zeros((B, 1, K, 1), dtype=acc, device=device),
            }
        return c


def _list_keys(K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``arange(K)`` int32, a power of two ``top >= K`` and ``top - 1`` (0-d int32) for :func:`block_lists`."""
    top = 1 << max(K - 1, 1).bit_length()
    i32 = {"device": device, "dtype": torch.int32}  # torch.full, not torch.tensor: no host-to-device copy (a sync)
    return torch.arange(K, **i32), torch.full((), top, **i32), torch.full((), top - 1, **i32)


class RF2Decision:
    """The last rf2 selection of a layer (for inspection and tests). ``density`` (B, H): executed video x video
    density of each head's block lists; ``kept_mass`` (B, H): pooled-softmax estimate of the attention mass kept,
    over video queries. Both are read from the device on first access (never on the hot path)."""

    def __init__(self, step: int, stats: torch.Tensor, nv2: float, budget: float, forced_density: float,
                 blocks_per_row: int, reused: bool, layout: Any, head_offset: int = 0) -> None:
        self.step, self.budget, self.forced_density = step, budget, forced_density  # budget: 1 - sparsity
        self.blocks_per_row = blocks_per_row  # top-k count of the free query blocks
        self.reused = reused  # the lists came from the reuse cache
        self.layout, self.head_offset = layout, head_offset  # head_offset: global id of head 0 (context parallel)
        self._stats, self._nv2 = stats, nv2

    def _host(self) -> np.ndarray:
        if isinstance(self._stats, torch.Tensor):
            self._stats = self._stats.cpu().numpy()
        return self._stats

    @property
    def density(self) -> np.ndarray:
        return self._host()[..., 1] / self._nv2

    @property
    def kept_mass(self) -> np.ndarray:
        return self._host()[..., 2]


def _block_sums(x: torch.Tensor, block: int, acc: torch.dtype) -> torch.Tensor:
    """Sums of ``x`` (B, H, N, D) over consecutive blocks of ``block`` tokens (the last one may be short) ->
    (B, H, nb, D) in ``acc``. The full blocks are one strided view of ``x`` (no copy)."""
    B, H, N, D = x.shape
    full = N // block
    parts = []
    if full:
        sb, sh, sn, sd = x.stride()
        xs = x.as_strided((B, H, full, block, D), (sb, sh, sn * block, sn, sd), x.storage_offset())
        parts.append(xs.sum(3, dtype=acc))
    if N > full * block:
        parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=acc))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


@torch.no_grad()
def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: RF2Plan,
    dplan: dict[str, torch.Tensor],
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rf2 block selection of one call: ``(sel, kept, k_valid)`` with ``sel`` bool (B, H, M, K) the executed block
    mask, ``kept`` (B, H) the estimated attention mass it keeps over video queries, ``k_valid`` (B, K) the valid keys
    per key block. Runs on the device, no host synchronisation."""
    sel, stats, k_valid = _select(q, k, plan, key_padding_mask, scale)
    return sel, stats[..., 2], k_valid[..., 0]


@torch.no_grad()
def _select(q: torch.Tensor, k: torch.Tensor, plan: RF2Plan, kpm: torch.Tensor | None, scale: float | None):
    """``(sel (B, H, M, K) bool, stats (B, H, 4) fp64, k_valid (B, K, 1))``, stats as in :class:`_CacheEntry`.

    Few device ops per call (issue 17 item 4): the shape-only tensors come from :meth:`RF2Plan.call_constants`.
    Every step computes the same values as the plain formulation (pooled means, logits + log(valid keys), forced
    regions, top-k of the rest, exact pair counts), in the same dtypes."""
    B, H, _, D = q.shape
    M, K = plan.num_m, plan.num_k
    scale = D**-0.5 if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = plan.call_constants(q.device, B, H, acc)
    d = plan.on(q.device)
    q_hat = _block_sums(q, plan.block_m, acc) / c["rows"]
    if kpm is None:
        k_hat = _block_sums(k, plan.block_n, acc) / c["keys_div"]
        bias, k_valid, n_k_valid = c["log_keys"], c["k_valid"], c["n_k_valid"]
        cand, forced, pair_keys = d["candidates"], d["forced"], c["pair_keys"]
    else:
        p = _padding_constants(c, d, kpm, B, H, acc)
        k_hat = _block_sums(k * p["w"], plan.block_n, acc) / p["keys_div"]
        bias, k_valid, n_k_valid = p["bias"], p["k_valid"], p["n_k_valid"]
        cand, forced, pair_keys = p["cand"], p["forced"], p["pair_keys"]
    qk = torch.bmm(q_hat.view(B * H, M, D), k_hat.view(B * H, K, D).transpose(1, 2)).view(B, H, M, K)
    logits = qk * scale + bias
    if plan.blocks_per_row:  # ties to the lower block index (a stable sort), as the Triton kernel
        sel = topk_lower_index(logits, cand & logits.isfinite(), plan.blocks_per_row) | forced
    else:
        sel = forced.expand(B, H, M, K)
    kept = torch.where(sel, logits.softmax(-1), c["zero"]).sum(-1)  # (B, H, M)
    kept = kept.to(torch.float64).view(B * H, M).mv(d["vrows_pb"]) / float(plan.layout.num_video)
    # exact pair counts: fp32 row sums of integers below 2^24, then fp64
    rows = torch.bmm(sel.to(torch.float32).reshape(B, H * M, K), pair_keys).view(B, H, M, 2)
    pairs = (rows * c["pair_rows"]).sum(2)  # (B, H, 2) fp64: computed pairs, video pairs
    stats = torch.cat([pairs, kept.view(B, H, 1), n_k_valid], dim=-1)
    return sel, stats, k_valid


def _padding_constants(c: dict[str, Any], d: dict[str, torch.Tensor], kpm: torch.Tensor, B: int, H: int,
                       acc: torch.dtype) -> dict[str, torch.Tensor]:
    """What the key padding mask ``kpm`` (B, N) changes in a selection call. Every layer of a forward gets the same
    mask: the result is reused while the mask is unchanged (:class:`~diffusers_attn.kernels.memo.TensorMemo`)."""
    memo = c.setdefault("_padding", TensorMemo())
    return memo.get(kpm, lambda: _padding_tensors(c, d, kpm, B, H, acc))


def _padding_tensors(c: dict[str, Any], d: dict[str, torch.Tensor], kpm: torch.Tensor, B: int, H: int,
                     acc: torch.dtype) -> dict[str, torch.Tensor]:
    w = kpm.view(B, 1, -1, 1)
    wf = w.to(acc)
    # valid keys per key block, (B, 1, K, 1): integer counts, exact in any summation order
    kv = c["no_keys"].index_add(2, c["key_block"], wf)
    kv_row = kv.transpose(2, 3)  # (B, 1, 1, K)
    has_keys = kv_row > 0
    k_valid = kv.view(B, -1, 1)
    p = {
        "w": w,
        "keys_div": kv.clamp_min(1),
        "bias": kv_row.log(),  # log(0) = -inf: a fully padded key block gets no mass
        "cand": d["candidates"] & has_keys,  # a fully padded key block is never picked
        "forced": d["forced"] & has_keys,
        "k_valid": k_valid,
        "n_k_valid": wf.sum(2, dtype=torch.float64).expand(B, H, 1),
        "pair_keys": torch.cat([k_valid.to(torch.float32), c["vkeys_col"]], -1),
    }
    return p


def block_lists(sel: torch.Tensor, k_max: int,
                keys: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block mask (..., M, K) as kernel lists ``(kv_indices int32 (..., M, k_max), kv_counts int32 (..., M))``.

    Like :func:`diffusers_attn.kernels.block_mask_to_lists`, but ``k_max`` (an upper bound of the row counts) comes
    from the caller, so nothing is read back to the host. ``keys``: :func:`_list_keys` on the device, when the
    caller caches them. Padding slots repeat the row's last listed block (0 for an empty row)."""
    K = sel.shape[-1]
    ar, top, low = _list_keys(K, sel.device) if keys is None else keys
    key = torch.where(sel, ar, top)  # selected blocks first, ascending; then `top` (a power of two >= K)
    key = key.topk(k_max, dim=-1, largest=False, sorted=True).values if k_max < K else key.sort(dim=-1).values
    # unselected slots -> 0 (top & (top - 1) == 0), then the running maximum carries the last selected block there
    idx = key.bitwise_and(low).cummax(-1).values
    return idx, sel.sum(-1, dtype=torch.int32)


def pair_counts(sel: torch.Tensor, dplan: dict[str, torch.Tensor], k_valid: torch.Tensor) -> torch.Tensor:
    """Exact (computed pairs, video x video pairs) per (batch, head) of a block mask: (B, H, 2) fp64, padded keys
    not counted (relaxed semantics: a query computes every valid key of its listed blocks)."""
    s = sel.to(torch.float32)  # row sums stay below 2^24: exact in fp32
    keys = torch.einsum("bhmk,bk->bhm", s, k_valid.to(torch.float32)).to(torch.float64)
    vkeys = (s @ dplan["vkeys_pb"].to(torch.float32)).to(torch.float64)
    return torch.stack([keys @ dplan["rows_pb"], vkeys @ dplan["vrows_pb"]], dim=-1)


@dataclass
class _CacheEntry:
    step: int
    key: tuple
    lists: tuple[torch.Tensor, torch.Tensor]
    stats: torch.Tensor  # (B, H, 4) fp64 on the device: computed pairs, video pairs, kept mass, valid keys of b


class RF2Attention:
    """rf2 for one :class:`~diffusers_attn.methods.rainfusion.RainFusionMethod` (its config, schedule and warnings);
    holds the plans and the reuse cache."""

    def __init__(self, method: Any) -> None:
        self.method, self.config = method, method.config
        self._plans: dict[tuple, RF2Plan] = {}
        self._cache: dict[tuple, _CacheEntry] = {}

    @classmethod
    def of(cls, method: Any) -> "RF2Attention":
        inst = method.__dict__.get("_rf2")
        if inst is None:
            inst = method._rf2 = cls(method)
        return inst

    def plan(self, layout: TokenLayout) -> RF2Plan:
        cfg = self.config
        key = (layout, cfg.block_m, cfg.block_n, float(cfg.sparsity), cfg.rf2_first_frame)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = RF2Plan(layout, cfg.block_m, cfg.block_n, cfg.sparsity, cfg.rf2_first_frame)
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
        """rf2 attention for heads ``[call.head_offset, call.head_offset + H)``; same schedule as rf1."""
        dense = self.method._checked_or_dense(q, k, layout, key_padding_mask, call, dense_fn, RF2_PATTERN_NAMES,
                                              "RainFusion rf2")
        if dense is not None:
            return dense
        B, H, N, D = q.shape
        dev = q.device
        with call.timer("plan", dev):
            plan = self.plan(layout)
            dplan = plan.call_constants(dev, B, H, torch.float64 if q.dtype == torch.float64 else torch.float32)
        entry, pending, reused = self._lookup(q, layout, key_padding_mask, call)
        if entry is None:
            with call.timer("select", dev):
                lists, stats = self._select_lists(q, k, plan, dplan, key_padding_mask, scale)
        else:
            lists = entry.lists
        cfg = self.config
        backend = select_backend(q, k, v, cfg.block_m, cfg.block_n, cfg.kernel_backend)
        with call.timer("attention", dev):
            out = block_sparse_attention(q, k, v, *lists, block_m=cfg.block_m, block_n=cfg.block_n,
                                         key_padding_mask=key_padding_mask, scale=scale, backend=backend)
        if entry is None:  # the stats stay on the device until they are read
            entry = _CacheEntry(call.step, pending, lists, stats)
            if pending is not None:
                self._cache[self._cache_key(call)] = entry
        return out, self._record(plan, entry, call, D, backend, q, k, v, reused)

    def _select_lists(self, q, k, plan: RF2Plan, c: dict[str, Any], kpm, scale):
        """``((kv_indices, kv_counts), stats)`` of a new selection: the fused kernels where the selection backend
        is not the PyTorch one (CUDA by default), else :func:`_select` and :func:`block_lists`."""
        cfg = self.config
        name = selection_backend(q, k, cfg.block_m, cfg.block_n, cfg.kernel_backend)
        if name == "torch":
            sel, stats, _ = _select(q, k, plan, kpm, scale)
            return block_lists(sel, plan.k_max, c["list_keys"]), stats
        d = plan.on(q.device)
        if kpm is None:
            keys = c.get("keys")
            if keys is None:
                keys = c["keys"] = key_blocks(plan.n, cfg.block_n, None, q.device)
        else:  # every layer of a forward passes the same mask: built once
            memo = c.setdefault("_keys_padding", TensorMemo())
            keys = memo.get(kpm, lambda: key_blocks(plan.n, cfg.block_n, kpm, q.device))
        idx, cnt, stats = block_topk_select(
            q, k, d["forced_u8"], block_m=cfg.block_m, block_n=cfg.block_n, topk=plan.blocks_per_row,
            k_max=plan.k_max, keys=keys, row_weights=d["row_weights"], col_weights=d["col_weights"], scale=scale,
            backend=name,
        )
        return (idx, cnt), stats

    # ----------------------------------------------------------------- reuse
    def _cache_key(self, call: CallInfo) -> tuple:
        return (None if self.config.rf2_share_layers else call.layer_index, call.call_in_step)

    def _lookup(self, q, layout, kpm, call: CallInfo) -> tuple[_CacheEntry | None, tuple | None, bool]:
        """(cached entry or None, the key to store a new entry under or None, reused)."""
        cfg = self.config
        if cfg.rf2_reuse_steps == 1 and not cfg.rf2_share_layers:
            return None, None, False
        B, H, N, _ = q.shape
        # The padding enters the lists (fully padded blocks are dropped), so it is part of the key.
        key = (layout, B, H, call.head_offset, q.device, tuple(valid_key_counts(kpm, B, N)))
        hit = self._cache.get(self._cache_key(call))
        if hit is not None and hit.key == key and 0 <= call.step - hit.step < cfg.rf2_reuse_steps:
            return hit, key, True
        return None, key, False

    # ----------------------------------------------------------------- accounting
    def _record(self, plan: RF2Plan, entry: _CacheEntry, call: CallInfo, head_dim: int, backend: str, q, k, v,
                reused: bool) -> MethodRecord:
        cfg = self.config
        B, H, _ = entry.stats.shape
        nv2 = float(plan.layout.num_video) ** 2
        info: dict[str, Any] = {"rainfusion_mode": "rf2", **kernel_check_info()}
        if not plan.budget_met:
            msg = (f"rf2 forced regions cost {plan.forced_density:.3f} of the video pairs, above the budget "
                   f"{plan.budget:.3f} (rf2_first_frame={cfg.rf2_first_frame!r}): only the forced part is kept")
            info["rf2_budget_unmet"] = msg
            self._warn_once(msg)

        def finish(arrays: list[np.ndarray]) -> dict[str, Any]:
            st = arrays[0]
            return {
                "head_patterns": np.full((B, H), RF2, dtype=np.int64),
                "computed": float(st[..., 0].sum()) * head_dim,
                "total": float(plan.n) * float(st[..., 3].sum()) * head_dim,
                "video_computed": float(st[..., 1].sum()) * head_dim,
                "video_total": nv2 * B * H * head_dim,
                "recalls": st[..., 2:3].astype(np.float32),  # per-head mean in the stats: the kept-mass estimate
            }

        record = deferred_record((entry.stats,), finish, pattern_names=RF2_PATTERN_NAMES, kernel=backend, info=info)
        record.decision = RF2Decision(
            step=call.step, stats=entry.stats, nv2=nv2, budget=plan.budget, forced_density=plan.forced_density,
            blocks_per_row=plan.blocks_per_row, reused=reused, layout=plan.layout, head_offset=call.head_offset,
        )
        if q.is_cuda and backend != "triton":  # exact but slow on a GPU: say so once, and count it in stats
            reason = fast_kernel_unavailable(q, k, v, cfg.block_m, cfg.block_n) or f"kernel_backend={backend!r}"
            record.slow_path = reason
            self._warn_once(f"RainFusion rf2 runs its sparse calls on the PyTorch path on {q.device}: {reason}")
        return record

    def _warn_once(self, msg: str) -> None:
        warned = self.method._warned
        if msg not in warned:
            warned.add(msg)
            logger.warning("diffusers-attn: %s", msg)
