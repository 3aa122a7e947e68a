"""Dense vs RainFusion fidelity on a trained reference model (same seed): the numbers behind the CI fixtures.

The reference grid is 9 latent frames x 8 x 8 = 576 video tokens, below RainFusion's library default
``min_video_tokens=4096`` (which would keep every call dense), so the sweep uses ``min_video_tokens=0`` and
16-token blocks (36 query/key blocks per frame set; 4 per latent frame) so that the sparse patterns are real, in
raster order (16-token tiles of an 8-column frame, 1 x 2 x 8, are raster runs anyway, and the raster windows are the
ones calibrated for this grid).
Everything else is the library default: ``dense_steps=0.25``, ``dense_layers=1``, ``arm_threshold=0.9``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .._defaults import SMALL_GRID  # noqa: F401 - re-exported: the fixtures and benchmarks import it from here
from ..eval.metrics import psnr, ssim
from ..install import get_attention_stats, remove_attention_acceleration
from ..pipelines.tiny import TinyPipelineSpec

#: Held-out-by-seed prompts from the caption grammar (every colour, shape, motion and background appears).
QUALITY_PROMPTS = (
    "red square moves right over checker",
    "blue circle moves down over stripes",
    "yellow triangle spins over dots",
    "changing circle moves left over checker",
    "green square moves up over dots",
    "red triangle moves left over stripes",
)



def run(spec: TinyPipelineSpec, prompt: str, seed: int = 0, **call: Any) -> np.ndarray:
    """(F, H, W, 3) float32 frames in [0, 1]."""
    kw = {**(spec.defaults or {}), **call}
    out = spec.pipe(**spec.prompt_kwargs(prompt), **kw, output_type="np", generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.frames[0], dtype=np.float32)


def fidelity_sweep(
    spec: TinyPipelineSpec,
    sparsities: Sequence[float],
    prompts: Sequence[str] = QUALITY_PROMPTS,
    *,
    seed: int = 0,
    call: dict[str, Any] | None = None,
    dense_cache: dict[str, np.ndarray] | None = None,
    **config: Any,
) -> list[dict[str, Any]]:
    """One row per (sparsity, prompt): PSNR / SSIM vs dense, realized video density and the pattern histogram.

    ``config`` overrides :class:`RainFusionConfig` fields on top of :data:`SMALL_GRID`. ``dense_cache`` (prompt ->
    dense frames, for this seed and call) lets several sweeps share the dense runs.
    """
    from ..api import apply_rainfusion
    from ..methods.rainfusion import RainFusionConfig

    call = dict(call or {})
    rows = []
    for prompt in prompts:
        if dense_cache is not None and prompt in dense_cache:
            dense = dense_cache[prompt]
        else:
            dense = run(spec, prompt, seed, **call)
            if dense_cache is not None:
                dense_cache[prompt] = dense
        for s in sparsities:
            cfg = RainFusionConfig(sparsity=s, **{**SMALL_GRID, **config})
            apply_rainfusion(spec.pipe, cfg)
            try:
                out = run(spec, prompt, seed, **call)
                stats = get_attention_stats(spec.pipe, log=False)
            finally:
                remove_attention_acceleration(spec.pipe)
            rows.append({
                "prompt": prompt, "sparsity": s, "psnr_db": psnr(dense, out), "ssim": ssim(dense, out),
                "video_density": stats.video_density, "density": stats.density,
                "patterns": {k: v for k, v in stats.pattern_histogram.items() if v},
            })
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparsity: mean and worst PSNR / SSIM over prompts, mean video density, summed pattern histogram."""
    out = []
    for s in sorted({r["sparsity"] for r in rows}):
        rs = [r for r in rows if r["sparsity"] == s]
        hist: dict[str, int] = {}
        for r in rs:
            for k, v in r["patterns"].items():
                hist[k] = hist.get(k, 0) + v
        finite = [min(r["psnr_db"], 99.0) for r in rs]
        out.append({
            "sparsity": s, "n": len(rs),
            "psnr_mean_db": float(np.mean(finite)), "psnr_min_db": float(np.min(finite)),
            "ssim_mean": float(np.mean([r["ssim"] for r in rs])), "ssim_min": float(np.min([r["ssim"] for r in rs])),
            "video_density": float(np.mean([r["video_density"] for r in rs])), "patterns": hist,
        })
    return out
