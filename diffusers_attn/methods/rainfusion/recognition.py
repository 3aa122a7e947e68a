"""ARM, the adaptive recognition module: per-head pattern choice from a few exact probe rows.

Probe rows are a Hammersley point set over the (t >= 1, h, w) box of the latent grid, so a few dozen rows cover
every frame and varied rows and columns (an index stride over S lines them up in a few columns whenever it is a
multiple of W). The choice is the cheapest pattern whose recall reaches the threshold (``arm_rule="cheapest"``), so
a pattern never wins merely because block rounding makes it execute more keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...kernels import probe_block_mass
from ...layout import TokenLayout
from .config import ARM_RULES, TEXTURAL

if TYPE_CHECKING:  # plan.py imports probe_rows from here
    from .plan import RainFusionPlan


def grid_to_index(layout: TokenLayout, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Sequence index of the video token at latent (t, h, w), in whatever order the layout puts video tokens (the
    inverse of :meth:`TokenLayout.token_coords`; the one place ARM maps grid cells to positions)."""
    _, H, W = layout.grid
    tc, hc, wc, _ = layout.token_coords()
    vid = tc >= 0
    position = torch.empty(layout.num_video, dtype=torch.long)
    position[(tc[vid] * H + hc[vid]) * W + wc[vid]] = vid.nonzero().squeeze(-1)
    return position[(t * H + h) * W + w]


def _radical_inverse(i: np.ndarray, base: int) -> np.ndarray:
    """Van der Corput radical inverse of the integers ``i`` in ``base``: values in [0, 1)."""
    i = i.astype(np.int64).copy()
    out = np.zeros(i.shape, dtype=np.float64)
    f = 1.0 / base
    while (i > 0).any():
        out += f * (i % base)
        i //= base
        f /= base
    return out


def probe_rows(layout: TokenLayout, n_probe: int) -> torch.Tensor:
    """``n_probe`` distinct probe query rows of S (video tokens of frames t >= 1), ascending, as sequence indices.

    The rows are the 3-D Hammersley set ((i + 1/2) / n, phi_2(i), phi_3(i)) mapped onto (t - 1, h, w): frames get
    equal shares and each frame's rows and columns follow the base-2 / base-3 van der Corput sequences
    (Hammersley 1960; Niederreiter, "Random Number Generation and Quasi-Monte Carlo Methods", 1992, ch. 3).
    Cells that coincide after rounding are replaced by unused cells evenly spaced in raster order. Deterministic.
    """
    T, H, W = layout.grid
    n_cells = (T - 1) * H * W
    n = int(min(max(n_probe, 0), n_cells))
    if n == n_cells:
        cells = np.arange(n_cells, dtype=np.int64)
    else:
        i = np.arange(n, dtype=np.int64)
        t = np.minimum(((i + 0.5) * (T - 1) / n).astype(np.int64), T - 2)
        h = np.minimum((_radical_inverse(i, 2) * H).astype(np.int64), H - 1)
        w = np.minimum((_radical_inverse(i, 3) * W).astype(np.int64), W - 1)
        cells = np.unique((t * H + h) * W + w)
        if cells.size < n:  # rounding collisions (only when n is a sizeable share of S)
            free = np.setdiff1d(np.arange(n_cells, dtype=np.int64), cells, assume_unique=True)
            need = n - cells.size
            pick = free[((np.arange(need) + 0.5) * free.size / need).astype(np.int64)]
            cells = np.sort(np.concatenate([cells, pick]))
    c = torch.from_numpy(cells)
    return grid_to_index(layout, 1 + c // (H * W), (c // W) % H, c % W).sort().values


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
    on CUDA that never materialises the (H, P, N) scores). A recognizer, not a trainable path: no autograd graph.
    """
    with torch.no_grad():  # no .detach() needed (and none spent: every op counts on the hot path)
        rows = dplan["probe_rows"]
        mass, tex = probe_block_mass(
            q.index_select(2, rows), k, block_n=plan.block_n, key_padding_mask=key_padding_mask,
            scale=scale, token_weights=dplan["textural_keys"], backend=backend,
        )  # (B, H, P, K), (B, H, P)
        B, H, P, K = mass.shape
        # (spatial, temporal) recall = mean over probe rows of the mass inside each pattern's blocks: one matmul
        # with the (P*K, 2) membership matrix (already divided by P).
        block_rec = (mass.reshape(B * H, P * K) @ dplan["probe_member_mat"]).view(B, H, 2)
        return torch.cat([block_rec, tex.mean(-1, keepdim=True)], dim=-1)


def choose_patterns(
    recalls: torch.Tensor, plan: RainFusionPlan, candidates: list[int], threshold: float, rule: str = "cheapest",
    out_dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """Pattern id per (batch, head) from ARM recalls (or any per-pattern kept mass, e.g. an exact oracle's).

    Candidates are ordered by executed plan density, ties in the order spatial, temporal, textural; degenerate
    patterns (whose plan is dense anyway, e.g. stride 1) are not candidates.

    * ``"cheapest"``: the first (cheapest) candidate whose recall >= ``threshold``; dense if none reaches it.
    * ``"argmax"``: the candidate with the highest recall (ties to the cheaper); dense if that recall < threshold.
      Raw recall favours whichever pattern executes more keys.

    Runs on the device with no host synchronisation; ``out_dtype`` is the dtype of the ids.
    """
    if rule not in ARM_RULES:
        raise ValueError(f"arm rule must be one of {ARM_RULES}, got {rule!r}")
    order = tuple(sorted(
        (p for p in candidates if plan.density[p] < 1.0 - 1e-9 and not (p == TEXTURAL and plan.params.stride == 1)),
        key=lambda p: (plan.density[p], p),
    ))
    B, H, _ = recalls.shape
    if not order:
        return torch.zeros(B, H, dtype=out_dtype, device=recalls.device)
    cols, ids = _choice_consts(plan, order, recalls.device, out_dtype)
    with torch.no_grad():
        r = recalls.index_select(-1, cols)  # (B, H, C): candidates, cheapest first
        if rule == "cheapest":
            # A last column that always passes stands for dense, so argmax (the first maximum) is the cheapest
            # passing candidate or dense; a NaN recall never passes.
            ok = torch.nn.functional.pad((r >= threshold).to(torch.uint8), (0, 1), value=1)
            return ids[ok.argmax(dim=-1)]
        best, pick = r.max(dim=-1)  # the first maximum: the lowest density among ties
        return ids[pick] * (best >= threshold)  # dense (0) when the best recall is below the threshold or NaN


def _choice_consts(plan: "RainFusionPlan", order: tuple[int, ...], device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Device constants of one candidate order (cached on the plan): recall columns, and pattern ids with dense
    appended."""
    cache = plan.__dict__.setdefault("_choice_consts", {})
    key = (order, device, dtype)
    hit = cache.get(key)
    if hit is None:
        cols = torch.tensor([p - 1 for p in order], device=device)
        ids = torch.tensor([*order, 0], dtype=dtype, device=device)
        hit = cache[key] = (cols, ids)
    return hit
