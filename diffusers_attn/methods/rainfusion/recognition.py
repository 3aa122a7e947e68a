"""ARM, the adaptive recognition module: per-head pattern choice from a few exact probe rows."""

from __future__ import annotations

from typing import Any

import torch

from ...kernels import probe_block_mass
from .config import TEXTURAL
from .plan import RainFusionPlan


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
    """Pattern id per (batch, head) from ARM recalls: argmax recall over candidate patterns, ties to
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

