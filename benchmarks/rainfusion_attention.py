"""One attention call: dense SDPA vs RainFusion (ARM + plan + execution), with realized density and ARM share.

    python benchmarks/rainfusion_attention.py                 # GPU: CogVideoX-5B and HunyuanVideo 720p shapes
    python benchmarks/rainfusion_attention.py --device cpu    # CPU: reduced shapes of the same layouts

Q/K have planted structure (heads split evenly between spatial, temporal and textural attention, see
``diffusers_attn.testing.planted_qkv``) so ARM has something to recognise; random Q/K would keep every head dense.
The plan (block lists) is built once per shape and reported separately; the timed call is what every layer pays.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, timeit  # noqa: E402

from diffusers_attn.adapters import run_method  # noqa: E402
from diffusers_attn.context import AttentionContext  # noqa: E402
from diffusers_attn.layout import TokenLayout  # noqa: E402
from diffusers_attn.methods.rainfusion import (
    # noqa: E402     RainFusionConfig,
    RainFusionMethod,
    arm_recalls,
    choose_patterns,
)
from diffusers_attn.testing import planted_qkv  # noqa: E402

# name: (grid, text_len, text_first, heads, head_dim, valid_text)
SHAPES = {
    # real shapes (spec section 7)
    "cogvideox-5b": ((13, 30, 45), 226, True, 48, 64, 226),
    "hunyuan-720p": ((33, 45, 80), 256, False, 24, 128, 64),
    # reduced shapes for CPU: same layouts, fewer heads and smaller frames
    "cogvideox-cpu": ((13, 15, 22), 226, True, 4, 64, 226),
    "hunyuan-cpu": ((17, 15, 26), 256, False, 2, 128, 64),
}


def bench_shape(name, args, device, dtype):
    grid, text_len, text_first, heads, head_dim, valid_text = SHAPES[name]
    layout = TokenLayout.text_first(grid, text_len) if text_first else TokenLayout.video_first(grid, text_len)
    N = layout.seq_len
    kinds = [("spatial", "temporal", "textural")[i % 3] for i in range(heads)]
    q, k, v = planted_qkv(layout, args.batch, kinds, head_dim, device=device, dtype=dtype)
    kpm = None
    if valid_text < text_len:
        kpm = torch.ones(args.batch, N, dtype=torch.bool, device=device)
        kpm[:, layout.text_offset + valid_text : layout.text_offset + text_len] = False
    base = dict(sparsity=args.sparsity, dense_steps=0, dense_layers=0, min_video_tokens=0,
                block_m=args.block_m, block_n=args.block_n)
    results = {"shape": name, "grid": grid, "tokens": N, "heads": heads, "head_dim": head_dim, "batch": args.batch}
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)

    def sdpa():
        mask = kpm[:, None, None, :] if kpm is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    results["dense_sdpa"] = timeit(sdpa, **timing)

    def method_call(cfg):
        method, ctx = RainFusionMethod(RainFusionConfig(**base, **cfg)), AttentionContext(None)
        import time

        t0 = time.perf_counter()
        plan = method.plan(layout)
        plan.on(device)
        build_ms = (time.perf_counter() - t0) * 1000
        fn = lambda: run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0,  # noqa: E731
                            context=ctx, dense_fn=sdpa)
        t = timeit(fn, **timing)
        ctx.stats.reset()
        fn()
        st = ctx.stats.summary()
        t.update(density=st.density, video_density=st.video_density, patterns=st.pattern_histogram,
                 plan_build_ms=build_ms)
        return t, method, plan

    full, method, plan = method_call({"arm_threshold": args.arm_threshold})
    results["rainfusion_full_call"] = full
    dplan = plan.on(device)

    def arm_only():
        r = arm_recalls(q, k, plan, dplan, kpm, None)
        return choose_patterns(r, plan, [1, 2, 3], args.arm_threshold).cpu()

    results["arm_only"] = timeit(arm_only, **timing)
    if device.type == "cuda":  # the PyTorch probe path, for the record of what the Triton probe kernel saves
        results["arm_only_torch_path"] = timeit(
            lambda: choose_patterns(arm_recalls(q, k, plan, dplan, kpm, None, backend="torch"), plan, [1, 2, 3],
                                    args.arm_threshold).cpu(), **timing)
    results["arm_share_of_call"] = results["arm_only"]["median_ms"] / full["median_ms"]
    results["arm_probe_rows"] = int(plan.probe_rows.numel())
    for pattern in () if args.sweep_min_video_tokens else ("spatial", "temporal", "textural"):
        results[f"forced_{pattern}"] = method_call({"force_pattern": pattern})[0]
    dense_ms = results["dense_sdpa"]["median_ms"]
    for key in ("rainfusion_full_call",) + (() if args.sweep_min_video_tokens else
                                             ("forced_spatial", "forced_temporal", "forced_textural")):
        results[key]["speedup_vs_sdpa"] = dense_ms / results[key]["median_ms"]
    return results


def sweep_min_video_tokens(args, device, dtype):
    """Full RainFusion call vs SDPA as the video grows (CogVideoX aspect, 13 frames): where does it start to pay?"""
    print("\n## min_video_tokens sweep: 13 frames, 3 heads (planted spatial/temporal/textural) x 64, text 226")
    print("| grid | video tokens | SDPA ms | RainFusion ms | speedup | density |")
    print("|---|---|---|---|---|---|")
    rows = []
    for h, w in ((4, 6), (6, 9), (8, 12), (10, 15), (12, 18), (15, 22), (20, 30), (24, 36)):
        SHAPES["_sweep"] = ((13, h, w), 226, True, 3, 64, 226)
        r = bench_shape("_sweep", args, device, dtype)
        f = r["rainfusion_full_call"]
        n_video = 13 * h * w
        rows.append({"grid": (13, h, w), "video_tokens": n_video, "sdpa_ms": r["dense_sdpa"]["median_ms"],
                     "rainfusion_ms": f["median_ms"], "speedup": f["speedup_vs_sdpa"], "density": f["density"]})
        print(f"| 13x{h}x{w} | {n_video} | {r['dense_sdpa']['median_ms']:.2f} | {f['median_ms']:.2f} | "
              f"{f['speedup_vs_sdpa']:.2f} | {f['density']:.3f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    p.add_argument("--dtype", default=None, help="bf16 (GPU default) | fp16 | fp32 (CPU default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--arm-threshold", type=float, default=0.9)
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--sweep-min-video-tokens", action="store_true",
                   help="instead of the fixed shapes, sweep the video size to choose min_video_tokens")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (50 if gpu else 5)
    shapes = args.shapes or (["cogvideox-5b", "hunyuan-720p"] if gpu else ["cogvideox-cpu", "hunyuan-cpu"])
    env = environment(device)
    print(f"# {env}")
    print(f"# dtype {dtype}, sparsity {args.sparsity}, arm_threshold {args.arm_threshold}, blocks "
          f"{args.block_m}x{args.block_n}, median of {args.repeats} after {args.warmup} warm-up")
    if args.sweep_min_video_tokens:
        rows = sweep_min_video_tokens(args, device, dtype)
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "sweep": rows}, indent=2, default=str))
        return
    all_results = []
    for name in shapes:
        r = bench_shape(name, args, device, dtype)
        all_results.append(r)
        print(f"\n## {name}: grid {r['grid']}, N={r['tokens']}, {r['heads']}x{r['head_dim']}, batch {r['batch']}")
        print("| path | median ms (p20-p80) | speedup vs SDPA | density (all / video) |")
        print("|---|---|---|---|")
        d = r["dense_sdpa"]
        print(f"| dense SDPA | {d['median_ms']:.2f} ({d['p20_ms']:.2f}-{d['p80_ms']:.2f}) | 1.00 | 1.000 / 1.000 |")
        for key in ("rainfusion_full_call", "forced_spatial", "forced_temporal", "forced_textural"):
            x = r[key]
            print(f"| {key} | {x['median_ms']:.2f} ({x['p20_ms']:.2f}-{x['p80_ms']:.2f}) | "
                  f"{x['speedup_vs_sdpa']:.2f} | {x['density']:.3f} / {x['video_density']:.3f} |")
        a = r["arm_only"]
        print(f"ARM alone: {a['median_ms']:.2f} ms = {100 * r['arm_share_of_call']:.1f}% of the full call "
              f"({r['arm_probe_rows']} probe rows); patterns chosen: {r['rainfusion_full_call']['patterns']}; "
              f"plan build (once per shape): {r['rainfusion_full_call']['plan_build_ms']:.0f} ms")
        if "arm_only_torch_path" in r:
            print(f"ARM with the PyTorch probe path instead of the Triton probe kernel: "
                  f"{r['arm_only_torch_path']['median_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": all_results}, indent=2, default=str))


if __name__ == "__main__":
    main()
