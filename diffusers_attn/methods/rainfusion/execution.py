"""Executing a per-head RainFusion decision: the table kernel (GPU), pattern groups (PyTorch path), textural gather."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...kernels import block_sparse_attention, block_sparse_attention_table
from ...kernels.dense_route import sdpa_dense
from ...kernels.memo import TensorMemo
from .config import DENSE, SKIP, SPATIAL, TEMPORAL, TEXTURAL
from .plan import RainFusionPlan


def triton_tables(plan: RainFusionPlan, dplan: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The Triton path's device constants (built once per plan and device): the pattern tables, the textural
    tables over the gathered keys, and lookups from pattern id to table row (dense heads to ``SKIP`` when SDPA
    runs them) and to "is textural" (shaped (5, 1, 1) so indexing gives a (B, H, 1, 1) mask in one op)."""
    t = dplan.get("triton")
    if t is None:
        t = dplan["triton"] = {
            "pattern": tuple(x.to(device) for x in plan.pattern_tables()),
            "textural": tuple(x.to(device) for x in plan.textural_tables()),
            "skip_dense": torch.tensor([SKIP, SPATIAL, TEMPORAL, TEXTURAL, SKIP], dtype=torch.int32, device=device),
            "tex_row": torch.tensor([0, 0, 0, 1, 0], dtype=torch.int32, device=device),
            "is_tex": torch.tensor([0, 0, 0, 1, 0], dtype=torch.bool, device=device).view(5, 1, 1),
        }
    return t


def execute_tables(cfg: Any, dense_heads: str, q, k, v, patterns: torch.Tensor, host: np.ndarray | None, plan: RainFusionPlan,
                   dplan: dict[str, Any], kpm, scale, timer, read_host) -> torch.Tensor | None:
    """The Triton path: one table-kernel launch for every head (``patterns`` int32 (B, H) on the device indexes the
    tables), then the textural heads' sparse rows over their gathered keys, and (``dense_heads == "sdpa"``)
    the dense heads in one SDPA call. Returns None when every head is dense (the caller runs the stock call).

    ``dense_heads`` is the call's route (``RainFusionConfig.dense_heads`` with ``"auto"`` resolved).
    ``"kernel"``: no host read; the textural launch covers every head (other heads read no block) and
    a device-side select keeps the textural heads' rows. ``"sdpa"``: ``read_host()`` gives the decisions on the
    host (``host`` when already known), read after the sparse kernel is queued; the dense heads are then gathered
    into one SDPA launch, and the textural rows run as in the kernel route when any head is textural."""
    t = triton_tables(plan, dplan, q.device)
    tex_possible = TEXTURAL in cfg_candidates(cfg, plan)
    if dense_heads == "kernel":
        out = block_sparse_attention_table(q, k, v, *t["pattern"], patterns, block_m=cfg.block_m,
                                           block_n=cfg.block_n, key_padding_mask=kpm, scale=scale, backend="triton")
        if tex_possible:
            _textural_all_heads(cfg, q, k, v, patterns, plan, dplan, t, kpm, scale, timer, out)
        return out
    out = block_sparse_attention_table(q, k, v, *t["pattern"], t["skip_dense"][patterns], block_m=cfg.block_m,
                                       block_n=cfg.block_n, key_padding_mask=kpm, scale=scale, backend="triton")
    if host is None:
        host = read_host()  # the sparse kernel is queued: the GPU keeps working while the host waits
    dense = np.nonzero(host == DENSE)
    if dense[0].size == host.size:
        return None
    if dense[0].size:
        bi, hi = _index_pair(dense, q.device)
        kpm_d = kpm.index_select(0, bi)[:, None, None, :] if kpm is not None else None
        # heads as the batch dim when each carries its own padding mask, else one batch of heads (flash-eligible)
        qd, kd, vd = (x[bi, hi].unsqueeze(1 if kpm is not None else 0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=kpm_d, scale=scale)
        out[bi, hi] = o.squeeze(1 if kpm is not None else 0)
    if tex_possible and (host == TEXTURAL).any():
        # The device-side form of the kernel route (one launch, memoized gathered mask and key bounds): fewer host
        # ops than gathering the listed heads, for a gather of every head's textural keys (a few % of the call).
        _textural_all_heads(cfg, q, k, v, patterns, plan, dplan, t, kpm, scale, timer, out)
    return out


def cfg_candidates(cfg: Any, plan: RainFusionPlan) -> set[int]:
    """Patterns a call may decide (host-known, no data): the forced pattern, else dense and the candidates."""
    if cfg.force_pattern is not None:
        pid = {"dense": DENSE, "spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}[cfg.force_pattern]
        return {DENSE if pid == TEXTURAL and plan.params.stride == 1 else pid}
    ids = {DENSE} | {{"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}[p] for p in cfg.patterns}
    if plan.params.stride == 1:
        ids.discard(TEXTURAL)
    return ids


def _index_pair(nz: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pair = torch.from_numpy(np.stack(nz)).to(device, non_blocking=True)
    return pair[0], pair[1]


def _textural_all_heads(cfg, q, k, v, patterns, plan, dplan, t, kpm, scale, timer, out) -> None:
    """Textural S rows with no host knowledge of which heads are textural: gather the keys of every head, one
    launch in which non-textural heads read no block, and keep the textural heads' rows on the device."""
    gi = dplan["gather_index"]
    s0, s1 = plan.layout.sparse_rows
    with timer("gather", q.device):
        kc, vc = k.index_select(2, gi), v.index_select(2, gi)
        kpm_c = _gathered_mask(dplan, kpm, gi)
    o = block_sparse_attention_table(q[:, :, s0:s1], kc, vc, *t["textural"], t["tex_row"][patterns],
                                     block_m=cfg.block_m, block_n=cfg.block_n, key_padding_mask=kpm_c, scale=scale,
                                     backend="triton")
    rows = out[:, :, s0:s1]
    torch.where(t["is_tex"][patterns], o, rows, out=rows)


def _gathered_mask(dplan: dict[str, Any], kpm: torch.Tensor | None, gi: torch.Tensor) -> torch.Tensor | None:
    """``kpm`` at the gathered key columns. Every layer of a forward passes the same mask, so the gather is reused
    while the mask is unchanged (and the kernel's key bounds of it with it)."""
    if kpm is None:
        return None
    memo = dplan.setdefault("_gathered_mask", TensorMemo())
    return memo.get(kpm, lambda: kpm.index_select(1, gi))


def execute_grouped(cfg: Any, q, k, v, patterns: np.ndarray, plan: RainFusionPlan, dplan: dict[str, Any], kpm,
                    scale, timer) -> torch.Tensor:
    """Heads grouped by pattern, one call per group (the right shape for the PyTorch path)."""
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
                o = sdpa_dense(qs, ks, vs, kpm_b, scale)
            elif p == TEXTURAL:
                o = _textural(qs, ks, vs, plan, dplan, kpm_b, scale, timer)
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

def _textural(qs, ks, vs, plan, dplan, kpm_b, scale, timer):
    o = torch.empty(*qs.shape[:3], vs.shape[-1], dtype=qs.dtype, device=qs.device)
    for r0, r1 in plan.layout.dense_row_ranges:
        o[:, :, r0:r1] = sdpa_dense(qs[:, :, r0:r1], ks, vs, kpm_b, scale)
    gi = dplan["gather_index"]
    with timer("gather", qs.device):
        kc, vc = ks.index_select(2, gi), vs.index_select(2, gi)
        kpm_c = kpm_b.index_select(1, gi) if kpm_b is not None else None
    s0, s1 = plan.layout.sparse_rows
    o[:, :, s0:s1] = sdpa_dense(qs[:, :, s0:s1], kc, vc, kpm_c, scale)
    return o
