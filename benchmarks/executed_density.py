"""Executed RainFusion density at the real model shapes (shape-only and exact: counts, not timings).

For every family of ``diffusers_attn.model_shapes`` at its default video size and each sparsity, prints the
executed video x video density of each pattern (blocks 128 x 64), the always-dense first-frame share and the
density-only bound on whole-run attention speedup under the default schedule, as a Markdown table.

    python benchmarks/executed_density.py [--sparsity 0.75 0.9] [--token-order raster|tiles] [--json OUT]

The rf2 column is rf2's shape-only bound (forced regions + its per-row top-k count at the largest candidate block;
exact when the candidate blocks are full).

Nothing here runs attention; the plan build time, printed last, is the only timing (CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from diffusers_attn.model_shapes import MODEL_SHAPES  # noqa: E402
from diffusers_attn.plan_report import plan_report  # noqa: E402

HEADER = (
    "| model, video | grid T×H×W (+ text) | σ | w / r / s | spatial | temporal | textural | rf2 | forced | "
    "f_dense | bound, densest rf1 pattern |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict, rf2: float) -> str:
    v, (T, H, W), pp = r["video"], r["grid"], r["pattern_params"]
    d, b = r["executed_video_density"], r["speedup_bound"]
    text = f" + {r['tokens']['text']}" if r["tokens"]["text"] else ""
    return (
        f"| {r['model']} {v['frames']}×{v['height']}×{v['width']} | {T}×{H}×{W}{text} | {r['sparsity']:g} | "
        f"{pp['spatial_window']} / {pp['temporal_rows']} / {pp['textural_stride']} | {d['spatial']:.3f} | "
        f"{d['temporal']:.3f} | {d['textural']:.3f} | {rf2:.3f} | {r['forced_video_share']:.3f} | "
        f"{r['schedule']['dense_call_share']:.3f} | {b['worst']:.2f}× ({r['worst_pattern']}) |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.75, 0.9])
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--token-order", default="tiles", choices=["raster", "tiles"], help="default: the library's")
    p.add_argument("--json", default=None, help="write the environment and every report here")
    args = p.parse_args(argv)

    env = environment(torch.device("cpu"))
    print("environment:", ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"token order {args.token_order}; blocks {args.block_m}x{args.block_n}; executed video x video density per pattern (nominal 1 - σ); "
          "forced = first-frame rows and keys; bound = 1 / (f_dense + (1 - f_dense) d_all-token)\n")
    print(HEADER)
    reports = []
    for sigma in args.sparsity:
        for name in MODEL_SHAPES:
            kw = dict(sparsity=sigma, block_m=args.block_m, block_n=args.block_n, token_order=args.token_order)
            r = plan_report(name, **kw)
            r2 = plan_report(name, mode="rf2", **kw)
            reports += [r, r2]
            print(row(r, r2["executed_video_density"]["rf2"]), flush=True)
    slowest = max(reports, key=lambda r: r["plan_build_seconds"])
    print(f"\nplan build (CPU, the only timing here): at most {slowest['plan_build_seconds']:.2f} s "
          f"({slowest['model']}, σ {slowest['sparsity']:g}, {slowest['tokens']['total']:,} tokens)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": env, "reports": reports}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
