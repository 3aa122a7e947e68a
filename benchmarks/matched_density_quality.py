"""Quality vs dense at matched executed density: RainFusion v1 (each fixed pattern), rf2, and a random-block
baseline run at each of their measured densities (what the structure buys over blocks chosen blindly).

    python benchmarks/matched_density_quality.py [--models ref-cogvideox ref-hunyuan] [--prompts 3] [--json OUT]
        [--sparsities 0.5,0.75] [--random-seeds 3]

CPU is fine (the models are tiny); the numbers are quality, not speed. Same seed as dense; library schedule
(dense_steps=0.25, dense_layers=1) and the small-grid settings of diffusers_attn/reference_models/quality.py
(``min_video_tokens=0``, 16-token blocks, raster order). The baseline is
:class:`~diffusers_attn.methods.rainfusion.random_blocks.RandomBlockMethod` (rf2's forced regions: text rows and
columns, first-frame keys as a sink; uniformly random key blocks elsewhere; draw seeds 0..n-1, pooled) with the
same schedule and a per-call target equal to the configuration's executed video density on its sparse calls, so the whole-run
densities match too (the dense warm-up and dense layer are identical). Densities are over the whole run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment

from diffusers_attn.api import apply_rainfusion
from diffusers_attn.eval.metrics import psnr, ssim
from diffusers_attn.install import get_attention_stats, install_method, remove_attention_acceleration
from diffusers_attn.methods.rainfusion import RainFusionConfig
from diffusers_attn.methods.rainfusion.random_blocks import RandomBlockMethod
from diffusers_attn.reference_models import REFERENCE_MODELS, load_reference_pipeline
from diffusers_attn.reference_models.quality import QUALITY_PROMPTS, SMALL_GRID, run

#: (label, RainFusionConfig overrides, the stats pattern whose density is the sparse calls' density)
CONFIGS = [
    ("v1 spatial", {"force_pattern": "spatial"}, "spatial"),
    ("v1 temporal", {"force_pattern": "temporal"}, "temporal"),
    ("v1 textural", {"force_pattern": "textural"}, "textural"),
    ("rf2 (sink)", {"mode": "rf2"}, "rf2"),
]


def generate(spec, prompts, dense: dict, install) -> dict:
    """Run ``prompts`` with the method that ``install()`` puts on the pipeline: PSNR/SSIM vs ``dense`` per prompt,
    whole-run video density and per-pattern video density (mean over prompts)."""
    rows = []
    for p in prompts:
        install()
        try:
            out = run(spec, p)
            st = get_attention_stats(spec.pipe, log=False)
        finally:
            remove_attention_acceleration(spec.pipe)
        rows.append({"prompt": p, "psnr_db": min(psnr(dense[p], out), 99.0), "ssim": ssim(dense[p], out),
                     "video_density": st.video_density, "pattern_video_density": dict(st.pattern_video_density),
                     "fallback_rate": st.dense_fallback_rate})
    ps, ss = [r["psnr_db"] for r in rows], [r["ssim"] for r in rows]
    pvd: dict[str, float] = {}
    for r in rows:
        for k, v in r["pattern_video_density"].items():
            pvd[k] = pvd.get(k, 0.0) + v / len(rows)
    return {"psnr_mean_db": float(np.mean(ps)), "psnr_min_db": float(np.min(ps)), "ssim_mean": float(np.mean(ss)),
            "ssim_min": float(np.min(ss)), "video_density": float(np.mean([r["video_density"] for r in rows])),
            "pattern_video_density": pvd, "rows": rows}


def measure(spec, sparsity: float, label: str, overrides: dict, pattern: str, prompts, dense: dict,
            seeds: list[int]) -> dict:
    cfg = RainFusionConfig(sparsity=sparsity, **{**SMALL_GRID, **overrides})
    res = generate(spec, prompts, dense, lambda: apply_rainfusion(spec.pipe, cfg))
    target = res["pattern_video_density"].get(pattern)
    out = {"configuration": label, "sparsity": sparsity, **res, "sparse_call_density": target, "random": None}
    if target is None or target >= 1.0:  # the configuration never went sparse: nothing to match
        return out
    base = RainFusionConfig(sparsity=sparsity, **SMALL_GRID)  # schedule, blocks, rf2_first_frame="sink"
    per_seed = [generate(spec, prompts, dense,
                         lambda sd=sd: install_method(spec.pipe, RandomBlockMethod(base, target, seed=sd)))
                for sd in seeds]
    rows = [r for g in per_seed for r in g["rows"]]
    out["random"] = {  # over seeds x prompts; the spread of the per-seed means says how much the draw matters
        "target": target, "seeds": list(seeds),
        "psnr_mean_db": float(np.mean([r["psnr_db"] for r in rows])),
        "psnr_min_db": float(np.min([r["psnr_db"] for r in rows])),
        "ssim_mean": float(np.mean([r["ssim"] for r in rows])), "ssim_min": float(np.min([r["ssim"] for r in rows])),
        "video_density": float(np.mean([r["video_density"] for r in rows])),
        "psnr_seed_means_db": [g["psnr_mean_db"] for g in per_seed], "rows": rows,
    }
    return out


def fmt(r: dict) -> str:
    def q(x: dict) -> str:
        return f"{x['psnr_mean_db']:.2f} ({x['psnr_min_db']:.2f}) | {x['ssim_mean']:.4f} ({x['ssim_min']:.4f})"

    rnd = r["random"]
    if rnd:
        sm = rnd["psnr_seed_means_db"]
        # the baseline cannot go below its forced part (text, first-frame keys): then the densities differ
        off = " (not matched: forced part)" if abs(rnd["video_density"] - r["video_density"]) > 0.005 else ""
        tail = (f"{rnd['video_density']:.3f}{off} | {q(rnd)} | {min(sm):.2f}–{max(sm):.2f} | "
                f"{r['psnr_mean_db'] - rnd['psnr_mean_db']:+.2f}")
    else:
        tail = "- | - | - | - | -"
    return f"| {r['configuration']} | {r['sparsity']:.2f} | {r['video_density']:.3f} | {q(r)} | {tail} |"


HEADER = ("| configuration | σ | video density (run) | PSNR mean (worst) dB | SSIM mean (worst) | random: video density "
          "(run) | random PSNR mean (worst) dB | random SSIM mean (worst) | random per-seed PSNR means dB | "
          "Δ PSNR (structure − random) dB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    ap.add_argument("--prompts", type=int, default=3, help=f"first n of the {len(QUALITY_PROMPTS)} quality prompts")
    ap.add_argument("--sparsities", default="0.5,0.75")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS), help="comma list of configuration labels")
    ap.add_argument("--random-seeds", type=int, default=3,
                    help="draw seeds 0..n-1 of the random baseline (the generation seed is always 0)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = QUALITY_PROMPTS[: args.prompts]
    wanted = args.configs.split(",")
    unknown = [w for w in wanted if w not in {c[0] for c in CONFIGS}]
    if unknown:
        ap.error(f"unknown configurations {unknown}; choose from {[c[0] for c in CONFIGS]}")
    sparsities = [float(x) for x in args.sparsities.split(",")]
    report = {"environment": environment(torch.device("cpu")), "settings": {**SMALL_GRID, "seed": 0,
              "random_seeds": args.random_seeds, "prompts": list(prompts)}, "models": {}}
    t0 = time.perf_counter()
    for name in args.models:
        spec = load_reference_pipeline(name)
        dense = {p: run(spec, p) for p in prompts}
        print(f"\n{name} ({len(prompts)} prompts, seed 0)\n\n{HEADER}", flush=True)
        rows = []
        for s in sparsities:
            for label, overrides, pattern in CONFIGS:
                if label in wanted:
                    rows.append(measure(spec, s, label, overrides, pattern, prompts, dense,
                                        list(range(args.random_seeds))))
                    print(fmt(rows[-1]), f"<!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
        report["models"][name] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
