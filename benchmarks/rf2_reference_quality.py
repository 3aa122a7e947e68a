"""RainFusion 2.0 (mode="rf2") vs dense on the trained reference models (same seed), beside rf1, and the effect of
rf2's first-frame rule and of its block-list reuse (``rf2_reuse_steps``, ``rf2_share_layers``) on output error.

    python benchmarks/rf2_reference_quality.py [--models ref-cogvideox ref-hunyuan] [--prompts 6] [--json OUT]

CPU is fine (the models are tiny); the numbers are quality, not speed. Settings as benchmarks/reference_quality.py:
library defaults (dense_steps=0.25, dense_layers=1) except ``min_video_tokens=0`` and 16-token blocks. The video
density is over the whole run (dense warm-up steps and the dense first layer included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from diffusers_attn.reference_models import REFERENCE_MODELS, load_reference_pipeline  # noqa: E402
from diffusers_attn.reference_models.quality import QUALITY_PROMPTS, fidelity_sweep, summarize  # noqa: E402

CONFIGS = [
    ("rf1, ARM threshold 0.9 (default)", {}, [0.6]),
    ("rf1, ARM threshold 0 (every head sparse)", {"arm_threshold": 0.0}, [0.6, 0.9]),
    ("rf2, first-frame sink (default)", {"mode": "rf2"}, [0.5, 0.6, 0.75, 0.9]),
    ("rf2, first frame dense", {"mode": "rf2", "rf2_first_frame": "dense"}, [0.6, 0.75]),
    ("rf2, first frame not special", {"mode": "rf2", "rf2_first_frame": "none"}, [0.6, 0.75]),
    ("rf2, lists reused 2 steps", {"mode": "rf2", "rf2_reuse_steps": 2}, [0.75]),
    ("rf2, lists reused 4 steps", {"mode": "rf2", "rf2_reuse_steps": 4}, [0.75]),
    ("rf2, one layer's lists for all layers", {"mode": "rf2", "rf2_share_layers": True}, [0.75]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    ap.add_argument("--prompts", type=int, default=len(QUALITY_PROMPTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = QUALITY_PROMPTS[: args.prompts]
    report = {"environment": environment(torch.device("cpu")), "models": {}}
    for name in args.models:
        spec = load_reference_pipeline(name)
        cache: dict = {}
        rows = []
        print(f"\n{name} ({len(prompts)} prompts, seed 0)\n")
        print("| configuration | sparsity | PSNR mean (worst) dB | SSIM mean (worst) | video density |")
        print("|---|---:|---:|---:|---:|")
        for title, cfg, sparsities in CONFIGS:
            for r in summarize(fidelity_sweep(spec, sparsities, prompts, dense_cache=cache, **cfg)):
                rows.append({"configuration": title, **r})
                print(f"| {title} | {r['sparsity']:.2f} | {r['psnr_mean_db']:.2f} ({r['psnr_min_db']:.2f}) | "
                      f"{r['ssim_mean']:.4f} ({r['ssim_min']:.4f}) | {r['video_density']:.3f} |", flush=True)
        report["models"][name] = rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
