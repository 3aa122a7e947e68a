"""Fidelity of RainFusion vs dense (same seed) on the trained reference model, over a sparsity sweep.

    python benchmarks/reference_quality.py                        # ARM (default threshold 0.9) and forced patterns
    python benchmarks/reference_quality.py --json outputs/refq.json
    python benchmarks/reference_quality.py --force arm --sparsities 0.75 --figures docs   # README figures

CPU is fine (the model is tiny); the numbers are quality, not speed. Settings: library defaults (dense_steps=0.25,
dense_layers=1, arm_threshold=0.9) except ``min_video_tokens=0`` and 16-token blocks, which the 576-token grid
needs for any sparsity to happen (see diffusers_attn/reference_models/quality.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from diffusers_attn.reference_models import DEFAULT_REFERENCE_MODEL, load_reference_pipeline  # noqa: E402
from diffusers_attn.reference_models.quality import fidelity_sweep, summarize  # noqa: E402


def table(summary: list[dict], title: str) -> str:
    lines = [f"### {title}", "",
             "| sparsity | PSNR mean (min) dB | SSIM mean (min) | video density | head-calls per pattern |",
             "|---:|---:|---:|---:|---|"]
    for r in summary:
        pats = ", ".join(f"{k} {v}" for k, v in sorted(r["patterns"].items()))
        lines.append(f"| {r['sparsity']:.2f} | {r['psnr_mean_db']:.2f} ({r['psnr_min_db']:.2f}) | "
                     f"{r['ssim_mean']:.4f} ({r['ssim_min']:.4f}) | {r['video_density']:.3f} | {pats} |")
    return "\n".join(lines)


def figures(spec, out_dir: Path, sparsity: float, seed: int,
            prompts=("red square moves right over checker", "yellow triangle spins over dots")) -> None:
    """README quickstart figures: a PNG strip (per prompt: dense row, RainFusion row) and a side-by-side GIF."""
    import numpy as np

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
    from diffusers_attn.compare import side_by_side_frames
    from diffusers_attn.eval.metrics import psnr, ssim
    from diffusers_attn.reference_models.quality import SMALL_GRID, run
    from diffusers_attn.reference_models.train import save_strip_png

    rows, labels, gif = [], [], []
    for prompt in prompts:
        dense = run(spec, prompt, seed)
        apply_rainfusion(spec.pipe, RainFusionConfig(sparsity=sparsity, **SMALL_GRID))
        try:
            sparse = run(spec, prompt, seed)
            st = get_attention_stats(spec.pipe, log=False)
        finally:
            remove_attention_acceleration(spec.pipe)
        rows += [torch.from_numpy(dense), torch.from_numpy(sparse)]
        labels += [f"dense: {prompt}",
                   f"RainFusion s={sparsity:g} (video density {st.video_density:.2f}): "
                   f"PSNR {psnr(dense, sparse):.1f} dB, SSIM {ssim(dense, sparse):.3f}"]
        up = lambda v: np.repeat(np.repeat(v, 4, axis=1), 4, axis=2)  # noqa: E731  (32 px is tiny on screen)
        gif.append(side_by_side_frames(up(dense), up(sparse), ("dense", f"RainFusion s={sparsity:g}")))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_strip_png(torch.stack(rows), out_dir / "quickstart.png", scale=4, labels=labels)
    import imageio

    frames = np.concatenate(gif, axis=1)
    imageio.mimwrite(out_dir / "quickstart.gif", list(frames), duration=180, loop=0)
    print(f"wrote {out_dir / 'quickstart.png'} and {out_dir / 'quickstart.gif'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_REFERENCE_MODEL)
    p.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--force", default="arm,spatial,temporal,textural",
                   help="comma list: arm (ARM choice) and/or forced patterns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--figures", default=None, help="also write quickstart.png / quickstart.gif to this folder")
    p.add_argument("--figure-sparsity", type=float, default=0.75)
    args = p.parse_args()
    torch.set_num_threads(1)
    spec = load_reference_pipeline(args.model)
    sp = [float(x) for x in args.sparsities.split(",")]
    result = {"env": environment(torch.device("cpu")), "model": args.model, "defaults": spec.defaults, "runs": {}}
    print(f"{args.model}: {spec.defaults}; env {result['env']}")
    for mode in args.force.split(","):
        kw = {} if mode == "arm" else {"force_pattern": mode}
        rows = fidelity_sweep(spec, sp, seed=args.seed, **kw)
        summ = summarize(rows)
        result["runs"][mode] = {"rows": rows, "summary": summ}
        print(table(summ, "ARM (arm_threshold=0.9)" if mode == "arm" else f"forced {mode}"), "\n", flush=True)
    if args.figures:
        figures(spec, Path(args.figures), args.figure_sparsity, args.seed)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
