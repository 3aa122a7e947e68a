"""Executing a per-head RainFusion decision: the table kernel (GPU), pattern groups (PyTorch path), textural gather."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...kernels import block_sparse_attention, block_sparse_attention_table, num_blocks
from .config import DENSE, TEXTURAL
from .plan import RainFusionPlan


def execute_tables(cfg: Any, q, k, v, patterns: np.ndarray, plan: RainFusionPlan, dplan: dict[str, Any], kpm, scale,
                   timer) -> torch.Tensor:
    """One kernel launch for every head (compact per-pattern tables), then the textural heads' sparse rows
    through the gather path. Pattern ids index the tables directly."""
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
            with timer("gather", q.device):
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
                o = _sdpa(qs, ks, vs, kpm_b, scale)
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
        o[:, :, r0:r1] = _sdpa(qs[:, :, r0:r1], ks, vs, kpm_b, scale)
    gi = dplan["gather_index"]
    with timer("gather", qs.device):
        kc, vc = ks.index_select(2, gi), vs.index_select(2, gi)
        kpm_c = kpm_b.index_select(1, gi) if kpm_b is not None else None
    s0, s1 = plan.layout.sparse_rows
    o[:, :, s0:s1] = _sdpa(qs[:, :, s0:s1], kc, vc, kpm_c, scale)
    return o


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

