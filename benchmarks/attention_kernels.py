"""Block-sparse kernel vs dense SDPA backends vs FlexAttention (same block mask), side by side on one GPU.

    python benchmarks/attention_kernels.py                  # CogVideoX-5B and HunyuanVideo 720p, batch 1 and 2, bf16
    python benchmarks/attention_kernels.py --sweep-tiles    # also time alternative kernel tile configs
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --smoke   # CPU logic check, numbers meaningless

For each shape: torch SDPA dense (flash, cuDNN, efficient backends), ours at block density 1.0/0.5/0.25/0.1
(random per-head block lists with exactly that share of key blocks per query block), FlexAttention with the same
lists as a BlockMask, and the full RainFusion call (ARM + plan + kernel) on planted-structure Q/K. Median of
``--repeats`` CUDA-event timings after warm-up, with an L2 flush before each run. Effective TFLOP/s counts only
the computed (kept) pairs: 4 * B * H * pairs * d / t.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, timeit  # noqa: E402

from diffusers_attn.kernels import block_mask_to_lists, block_sparse_attention, num_blocks  # noqa: E402

SHAPES = {  # name: (N, heads, head_dim)
    "cogvideox-5b": (17_776, 48, 64),
    "hunyuan-720p": (119_056, 24, 128),
    "smoke": (200, 2, 64),
}


def random_lists(B, H, n, bm, bn, density, device, seed=0):
    """Per-(b, h) lists with round(density * K) blocks per query block (at least 1; all when density is 1)."""
    M, K = num_blocks(n, bm), num_blocks(n, bn)
    keep = max(1, round(density * K))
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(B, H, M, K, generator=g)
    kth = scores.topk(keep, dim=-1).values[..., -1:]
    mask = scores >= kth
    idx, cnt = block_mask_to_lists(mask)
    return mask, idx.to(device), cnt.to(device)


def computed_pairs(mask, n, bm, bn):
    """Exact (q, k) pairs inside the listed blocks, tails included."""
    M, K = mask.shape[-2:]
    rows = torch.full((M,), bm, dtype=torch.float64)
    rows[-1] = n - (M - 1) * bm
    keys = torch.full((K,), bn, dtype=torch.float64)
    keys[-1] = n - (K - 1) * bn
    return float(torch.einsum("bhmk,m,k->", mask.double(), rows, keys))


def sdpa_backends(device):
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"math/cpu": None}
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def flex_fn(idx, cnt, n, bm, bn, device):
    """FlexAttention with the same lists (the package's "flex" backend: BlockMask cached per list tensors, kernel
    tiles dividing the list blocks, compiled on CUDA), or None and the reason it is unavailable."""
    from diffusers_attn.kernels import available_backends

    if "flex" not in available_backends():
        return None, "flex backend unavailable (needs torch >= 2.5)"
    return (lambda q, k, v: block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, backend="flex")), None


def bench(name, B, args, device, dtype, timing):
    n, H, D = SHAPES[name]
    bm, bn = args.block_m, args.block_n
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype) for _ in range(3))
    dense_flops = 4.0 * B * H * n * n * D
    rows = []

    for label, backend in sdpa_backends(device).items():
        try:
            if backend is None:
                fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            else:
                from torch.nn.attention import sdpa_kernel

                def fn(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v)
            t = timeit(fn, **timing)
            rows.append({"path": f"SDPA dense ({label})", "density": 1.0, **t,
                         "tflops": dense_flops / t["median_ms"] / 1e9})
        except RuntimeError as e:
            rows.append({"path": f"SDPA dense ({label})", "error": str(e).splitlines()[0]})
    best_sdpa = min((r["median_ms"] for r in rows if "median_ms" in r), default=float("nan"))

    for density in args.densities:
        mask, idx, cnt = random_lists(B, H, n, bm, bn, density, device)
        pairs = computed_pairs(mask, n, bm, bn)
        rho = pairs / (B * H * n * n)
        ours = timeit(lambda: block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn,
                                                     backend=args.backend), **timing)
        row = {"path": f"ours ({args.backend})", "density": rho, **ours,
               "tflops": 4.0 * pairs * D / ours["median_ms"] / 1e9,
               "speedup_vs_best_sdpa": best_sdpa / ours["median_ms"]}
        if not args.no_flex:
            fx, why = flex_fn(idx, cnt, n, bm, bn, device)
            if fx is None:
                row["flex"] = why
            else:
                try:
                    ft = timeit(lambda: fx(q, k, v), **timing)
                    row["flex_median_ms"] = ft["median_ms"]
                    row["ratio_vs_flex"] = ft["median_ms"] / ours["median_ms"]
                except Exception as e:  # noqa: BLE001
                    row["flex"] = f"flex run failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        rows.append(row)
        if args.sweep_tiles and device.type == "cuda":
            from diffusers_attn.kernels.block_sparse_triton import block_sparse_attention_triton

            for cfg in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4)):
                if bm % cfg[0] or bn % cfg[1]:
                    continue
                t = timeit(lambda: block_sparse_attention_triton(q, k, v, idx, cnt, block_m=bm, block_n=bn,
                                                                 config=cfg), **timing)
                rows.append({"path": f"ours tiles {cfg}", "density": rho, **t,
                             "tflops": 4.0 * pairs * D / t["median_ms"] / 1e9})
        del mask, idx, cnt
    return {"shape": name, "batch": B, "tokens": n, "heads": H, "head_dim": D, "rows": rows}


def _rainfusion_setup(name, args, device, dtype):
    """(call, sdpa, ctx) of one RainFusion layer call on planted-structure Q/K at the real layout."""
    from diffusers_attn.adapters import run_method
    from diffusers_attn.context import AttentionContext
    from diffusers_attn.layout import TokenLayout
    from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod
    from diffusers_attn.testing import planted_qkv

    layouts = {
        "cogvideox-5b": (TokenLayout.text_first((13, 30, 45), 226), 48, 64, None),
        "hunyuan-720p": (TokenLayout.video_first((33, 45, 80), 256), 24, 128, 64),
        "smoke": (TokenLayout.text_first((4, 6, 8), 8), 3, 64, None),
    }
    layout, H, D, valid_text = layouts[name]
    kinds = [("spatial", "temporal", "textural")[i % 3] for i in range(H)]
    q, k, v = planted_qkv(layout, 1, kinds, D, device=device, dtype=dtype)
    kpm = None
    if valid_text is not None:
        kpm = torch.ones(1, layout.seq_len, dtype=torch.bool, device=device)
        kpm[:, layout.text_offset + valid_text :] = False
    cfg = RainFusionConfig(sparsity=args.sparsity, dense_steps=0, dense_layers=0, min_video_tokens=0,
                           block_m=args.block_m, block_n=args.block_n, kernel_backend=args.backend,
                           mode=getattr(args, "mode", "rf1"), dense_heads=getattr(args, "dense_heads", "sdpa"))
    method, ctx = RainFusionMethod(cfg), AttentionContext(None)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if kpm is None else kpm[:, None, None])

    def call():
        return run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0,
                          context=ctx, dense_fn=sdpa)

    return call, sdpa, ctx


def rainfusion_call(name, args, device, dtype, timing, dense_ms=None):
    """Full RainFusion layer call (ARM + cached plan + kernel) on planted-structure Q/K at the real layout.
    ``dense_ms``: the dense SDPA time of this shape and input when already measured (it is not timed again)."""
    call, sdpa, ctx = _rainfusion_setup(name, args, device, dtype)
    dense_t = {"median_ms": dense_ms} if dense_ms is not None else timeit(sdpa, **timing)
    full_t = timeit(call, **timing)
    ctx.stats.reset()
    call()
    st = ctx.stats.summary()
    return {"shape": name, "dense_sdpa_ms": dense_t["median_ms"], "rainfusion_ms": full_t["median_ms"],
            "speedup": dense_t["median_ms"] / full_t["median_ms"], "density": st.density,
            "video_density": st.video_density, "patterns": st.pattern_histogram, "one_call_breakdown_ms": st.timings_ms,
            "dense_heads_route": st.info.get("dense_heads"), "dense_heads_measured": st.info.get("dense_heads_measured")}


def rainfusion_graph(name, args, device, dtype, timing):
    """Capture one sparse RainFusion layer call (recognition, selection, kernels) in a CUDA graph and replay it.

    A host read or any other sync inside the call makes the capture raise. The replay must equal the eager call on
    the same inputs (same kernels, same decisions); eager vs replay time is the host work the graph removes."""
    if device.type != "cuda":
        return {"shape": name, "skipped": "CUDA graphs need a CUDA device"}
    call, _, ctx = _rainfusion_setup(name, args, device, dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compilation, self-checks, plans, tables
        for _ in range(2):
            eager = call()
    torch.cuda.current_stream().wait_stream(side)
    eager = eager.clone()
    ctx.stats.flush()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call()
    graph.replay()
    torch.cuda.synchronize()
    diff = (static_out.float() - eager.float()).abs().max().item()
    eager_t = timeit(call, **timing)
    graph_t = timeit(graph.replay, **timing)
    ctx.stats.reset()
    return {"shape": name, "captured": True, "max_abs_diff_vs_eager": diff, "finite": bool(static_out.isfinite().all()),
            "eager_ms": eager_t["median_ms"], "replay_ms": graph_t["median_ms"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["cogvideox-5b", "hunyuan-720p"])
    p.add_argument("--batches", nargs="*", type=int, default=[1, 2])
    p.add_argument("--densities", nargs="*", type=float, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.75, help="for the full RainFusion call")
    p.add_argument("--backend", default="triton")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--sweep-tiles", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (TRITON_INTERPRET=1) to check the script")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
        args.shapes, args.batches, args.block_m, args.block_n = ["smoke"], [1], 32, 32
        args.repeats, args.warmup, args.densities = 2, 0, [1.0, 0.25]
        device, dtype = torch.device("cpu"), torch.float16
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    env = environment(device)
    print(f"# {env}\n# dtype {dtype}, lists {args.block_m}x{args.block_n}, median of {args.repeats}")
    results = {"env": env, "kernels": [], "rainfusion": []}
    for name in args.shapes:
        for B in args.batches:
            r = bench(name, B, args, device, dtype, timing)
            results["kernels"].append(r)
            print(f"\n## {name} (N={r['tokens']}, {r['heads']}x{r['head_dim']}), batch {B}")
            print("| path | density | median ms (p20-p80) | eff. TFLOP/s | vs best SDPA | Flex ms | Flex/ours |")
            print("|---|---|---|---|---|---|---|")
            for x in r["rows"]:
                if "error" in x:
                    print(f"| {x['path']} | - | {x['error']} | | | | |")
                    continue
                flex = f"{x['flex_median_ms']:.3f}" if "flex_median_ms" in x else x.get("flex", "")
                ratio = f"{x['ratio_vs_flex']:.2f}" if "ratio_vs_flex" in x else ""
                print(f"| {x['path']} | {x['density']:.3f} | {x['median_ms']:.3f} ({x['p20_ms']:.3f}-"
                      f"{x['p80_ms']:.3f}) | {x['tflops']:.1f} | {x.get('speedup_vs_best_sdpa', 1.0):.2f} | "
                      f"{flex} | {ratio} |")
        rf = rainfusion_call(name, args, device, dtype, timing)
        results["rainfusion"].append(rf)
        print(f"full RainFusion call ({name}, sparsity {args.sparsity}, planted Q/K): {rf['rainfusion_ms']:.3f} ms vs "
              f"SDPA {rf['dense_sdpa_ms']:.3f} ms = {rf['speedup']:.2f}x; density {rf['density']:.3f} "
              f"(video {rf['video_density']:.3f}); patterns {rf['patterns']}; one call: {rf['one_call_breakdown_ms']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
