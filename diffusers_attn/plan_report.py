"""Shape-only RainFusion report for a real model: what the planner executes at a sparsity, and what that bounds.

:func:`plan_report` builds the :class:`~diffusers_attn.layout.TokenLayout` of a registered family
(:mod:`diffusers_attn.model_shapes`) and the plan ``RainFusionMethod.plan`` would use at that shape, and reports
the executed densities (block relaxation and the always-dense first frame and text included) next to the nominal
``1 - sparsity``. No weights, no GPU: the numbers are exact counts over the layout.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
from types import SimpleNamespace
from typing import Any

from .layout import TokenLayout
from .methods.rainfusion import PATTERN_NAMES, RainFusionConfig, RainFusionMethod
from .methods.rainfusion.rf2 import RF2Plan
from .model_shapes import ModelShape, get_model_shape, resolve_video

MODES = ("rf1", "rf2")
SPARSE = ("spatial", "temporal", "textural")
DEFAULT_STEPS = 50  # the stock pipelines' num_inference_steps


def model_layout(shape: ModelShape, grid: tuple[int, int, int]) -> TokenLayout:
    """The joint sequence of one attention call of ``shape`` at the post-patch ``grid``."""
    if shape.text_position == "last":
        return TokenLayout.video_first(grid, shape.text_len)
    return TokenLayout.text_first(grid, shape.text_len)  # "none": text_len 0


def forced_video_share(layout: TokenLayout) -> float:
    """Share of video x video pairs every pattern computes: only pairs of video tokens with t >= 1 on both sides
    may be skipped; first-frame rows attend everything and every row attends the first frame. Counted, not
    located, so it holds for any token order."""
    n_v = layout.num_video
    n_s = n_v - layout.frame_tokens
    return (n_v * n_v - n_s * n_s) / (n_v * n_v)


def dense_call_share(method: RainFusionMethod, layout: TokenLayout, layers: int, steps: int) -> float:
    """Share of the run's attention calls the method's schedule runs dense (warm-up steps, dense and skipped
    layers, tail, size rules), asked of the method itself for every (step, layer)."""
    dense = sum(
        method.fallback_reason(layout, layer, SimpleNamespace(step=step, num_steps=steps)) is not None
        for step in range(steps)
        for layer in range(layers)
    )
    return dense / (steps * layers)


def _config(sparsity: float, mode: str, block_m: int, block_n: int, steps: int,
            overrides: dict[str, Any]) -> RainFusionConfig:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fields = {f.name for f in dataclasses.fields(RainFusionConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown RainFusionConfig field(s): {', '.join(unknown)}")
    return RainFusionConfig(sparsity=sparsity, block_m=block_m, block_n=block_n, num_inference_steps=steps,
                            mode=mode, **overrides)


def rf2_bound(layout: TokenLayout, config: RainFusionConfig) -> tuple[float, float]:
    """rf2's executed (video x video, all-token) density at most: forced regions plus ``blocks_per_row`` of the
    largest candidate key block for every free query block."""
    p = RF2Plan(layout, config.block_m, config.block_n, config.sparsity, config.rf2_first_frame)
    forced_rows = p.forced.all(dim=1)
    cand = ~p.forced.all(dim=0)
    k = p.blocks_per_row
    vid = float(p.vrows_pb @ p.forced.double() @ p.vkeys_pb)
    vid += k * float(p.vrows_pb[~forced_rows].sum()) * float(p.vkeys_pb[cand].max() if cand.any() else 0.0)
    allt = float(p.rows_pb @ p.forced.double() @ p.keys_pb)
    allt += k * float(p.rows_pb[~forced_rows].sum()) * float(p.keys_pb[cand].max() if cand.any() else 0.0)
    return min(vid / layout.num_video ** 2, 1.0), min(allt / layout.seq_len ** 2, 1.0)


def plan_report(
    model: str,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    sparsity: float = 0.75,
    mode: str = "rf1",
    block_m: int = 128,
    block_n: int = 64,
    *,
    steps: int = DEFAULT_STEPS,
    **rainfusion_overrides: Any,
) -> dict[str, Any]:
    """Executed RainFusion densities of ``model`` at ``frames x height x width`` (family defaults for None).

    Returns a JSON-ready dict: ``executed_video_density`` (video x video pairs a head of each pattern computes,
    over num_video^2) and ``executed_density`` (all tokens, text included); ``forced_video_share``;
    ``speedup_bound``: 1 / (f + (1 - f) d), the attention speedup of the whole run if every head of every
    sparse call used that pattern at all-token density d, f being the dense share of calls under the
    configured schedule (``RainFusionConfig`` defaults: 25% dense warm-up steps, first layer dense). It counts
    pairs only: ARM probes, heads ARM keeps dense and kernel efficiency are not in it.
    ``rainfusion_overrides`` are further ``RainFusionConfig`` fields (``dense_steps=3``, ``spatial_window=2``).
    """
    shape = get_model_shape(model)
    video = resolve_video(shape, frames, height, width)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    config = _config(sparsity, mode, block_m, block_n, steps, rainfusion_overrides)
    grid = shape.latent_grid(*video)
    method = RainFusionMethod(config)
    layout = dataclasses.replace(model_layout(shape, grid), order=method.token_order(grid))
    t0 = time.perf_counter()
    plan = method.plan(layout)
    build_s = time.perf_counter() - t0

    n_v = layout.num_video
    video_density = {name: plan.video_pairs(i) / (n_v * n_v) for i, name in enumerate(PATTERN_NAMES)}
    density = {name: float(plan.density[i]) for i, name in enumerate(PATTERN_NAMES)}
    if mode == "rf2":  # block top-k per call: the shape-only bound (exact when the candidate blocks are full)
        video_density["rf2"], density["rf2"] = rf2_bound(layout, config)
    f_dense = dense_call_share(method, layout, shape.layers, steps)
    patterns = ("rf2",) if mode == "rf2" else SPARSE
    bound = {p: 1.0 / (f_dense + (1.0 - f_dense) * density[p]) for p in patterns}
    worst = max(patterns, key=lambda p: density[p])
    reason = None
    if f_dense >= 1.0:  # e.g. fewer than min_video_tokens, 2 or fewer latent frames: say why nothing is sparse
        reason = method.fallback_reason(layout, shape.layers - 1, SimpleNamespace(step=steps - 1, num_steps=steps))
    return {
        "model": shape.name,
        "hub_id": shape.hub_id,
        "mode": mode,
        "video": {"frames": video[0], "height": video[1], "width": video[2]},
        "grid": list(grid),
        "tokens": {"video": n_v, "text": layout.text_len, "total": layout.seq_len},
        "text_position": shape.text_position,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "layers": shape.layers,
        "tflop_per_dense_call": 4.0 * layout.seq_len ** 2 * shape.heads * shape.head_dim / 1e12,
        "sparsity": float(config.sparsity),
        "nominal_density": 1.0 - float(config.sparsity),
        "pattern_params": {"spatial_window": plan.params.window, "temporal_rows": plan.params.rows,
                           "textural_stride": plan.params.stride},
        "token_order": list(layout.order) if layout.order is not None else "raster",
        "block_m": config.block_m,
        "block_n": config.block_n,
        "executed_video_density": video_density,
        "executed_density": density,
        "forced_video_share": forced_video_share(layout),
        "schedule": {"steps": steps, "dense_steps": config.steps_from(config.dense_steps, steps, "dense_steps"),
                     "dense_layers": config.dense_layers, "dense_call_share": f_dense,
                     "always_dense_reason": reason},
        "speedup_bound": {**bound, "worst": bound[worst]},
        "worst_pattern": worst,
        "plan_build_seconds": build_s,
    }


def format_plan_table(report: dict[str, Any]) -> str:
    """The pattern table of a :func:`plan_report` (the model lines come from ``ModelShape.describe``)."""
    r, sched = report, report["schedule"]
    pp = r["pattern_params"]
    lines = [
        (f"RainFusion {r['mode']}   sparsity {r['sparsity']:g} (nominal density {r['nominal_density']:.3f}), "
         f"blocks {r['block_m']}x{r['block_n']}; spatial w={pp['spatial_window']} frames, temporal "
         f"r={pp['temporal_rows']} rows, textural stride {pp['textural_stride']}"),
        f"forced video     {r['forced_video_share']:.2%} of video x video pairs (first latent frame rows and keys)",
        (f"schedule         {sched['steps']} steps, dense warm-up {sched['dense_steps']} steps, "
         f"{sched['dense_layers']} dense layer(s): {sched['dense_call_share']:.1%} of attention calls dense"),
    ]
    if sched["always_dense_reason"]:
        lines.append(f"note             every call runs dense at this shape: {sched['always_dense_reason']}")
    header = f"{'pattern':<10}{'executed video density':>24}{'executed density (all tokens)':>31}{'speedup bound':>15}"
    lines += ["", header]
    for p in (("rf2",) if r["mode"] == "rf2" else SPARSE):
        mark = "  (densest)" if p == r["worst_pattern"] else ""
        lines.append(f"{p:<10}{r['executed_video_density'][p]:>24.4f}{r['executed_density'][p]:>31.4f}"
                     f"{r['speedup_bound'][p]:>14.2f}x{mark}")
    note = ("executed density counts the pairs the kernels compute (whole blocks, first frame and text dense); the "
            "bound is 1 / (f + (1 - f) d) over attention pairs only (no ARM probes, no heads kept dense, no kernel "
            f"efficiency). Plan built in {r['plan_build_seconds']:.2f} s.")
    return "\n".join([*lines, "", *textwrap.wrap(note, 110)])
