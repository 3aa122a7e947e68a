"""FEAT benchmarks: the Bi-WKV kernel vs SDPA, one FEAT attention call vs SDPA, and one denoising step.

    python benchmarks/feat.py                         # GPU: all parts at full size, bf16
    python benchmarks/feat.py --parts kernel          # Bi-WKV vs SDPA at 4k/16k/32k/119k tokens, head_dim 64/128
    python benchmarks/feat.py --device cpu            # CPU: reduced sizes (kernel + call parts), fp32

* ``kernel``: one bidirectional Bi-WKV scan over N tokens with C = H * head_dim channels (H = 3072 / head_dim,
  as in CogVideoX-5B / HunyuanVideo) vs SDPA over the same N with H heads; forward and forward+backward; peak
  memory above the inputs. GPU: the Triton kernel (automatic dispatch); CPU: the PyTorch ``cumsum`` (T-normalised
  decay, FEAT's case) and ``chunked`` (any decay, the processor's case) forms.
* ``call``: one attention layer of the FEAT processor (exact text softmax + W/H/T Bi-WKV scans + channel term) vs
  dense SDPA on the real CogVideoX-5B (13x30x45 + 226 text) and HunyuanVideo 720p (33x45x80 + 256 text) layouts.
* ``step``: one denoising step of full-size random-weight CogVideoX-5B and HunyuanVideo 720p (configs from
  ``step_e2e.py``): dense vs FEAT on all layers vs hybrid (every ``--hybrid-every``-th layer on softmax). GPU only.

Speed only: random weights and random inputs say nothing about quality (an undistilled FEAT processor is not the
softmax model). Median of ``--repeats`` after warm-up (CUDA events with an L2 flush on GPU).
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

from diffusers_attn.kernels.biwkv import biwkv  # noqa: E402
from diffusers_attn.layout import TokenLayout  # noqa: E402
from diffusers_attn.methods.feat import FEATConfig, FEATMethod  # noqa: E402

GPU_TOKENS = (4096, 16384, 32768, 119056)
CPU_TOKENS = (1024, 4096, 8192)
GRIDS = {  # name: (grid (T, H, W), text_len, heads, head_dim, text_first)
    "cogvideox-5b": ((13, 30, 45), 226, 48, 64, True),
    "hunyuan-720p": ((33, 45, 80), 256, 24, 128, False),
}
CPU_GRIDS = {
    "cogvideox-cpu": ((13, 15, 22), 226, 2, 64, True),
    "hunyuan-cpu": ((9, 15, 26), 256, 2, 128, False),
}


def peak_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_kernel(args, device, dtype, timing):
    rows = []
    tokens = args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)
    for d in args.head_dims:
        H = args.heads or (3072 // d if device.type == "cuda" else 2)
        C = H * d
        for N in tokens:
            g = torch.Generator(device="cpu").manual_seed(N)
            q, k, v = (torch.randn(1, H, N, d, generator=g).to(device, dtype) for _ in range(3))
            kw, vw = (torch.randn(1, N, C, generator=g).to(device, dtype) for _ in range(2))
            w_norm = torch.randn(C, generator=g).to(device) * 5 / N  # FEAT: decay / T
            w_local = torch.rand(C, generator=g).to(device) + 0.1  # processor: per-token decay
            u = torch.randn(C, generator=g).to(device)
            row = {"N": N, "heads": H, "head_dim": d}
            # SDPA (quadratic); skip where it would take too long on CPU
            if device.type == "cuda" or N <= args.cpu_sdpa_max:
                row["sdpa_fwd"] = timeit(lambda: F.scaled_dot_product_attention(q, k, v), **timing)["median_ms"]
                row["sdpa_fwd_mem_mb"] = peak_mb(lambda: F.scaled_dot_product_attention(q, k, v), device)
                if args.backward:
                    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

                    def sdpa_fb():
                        F.scaled_dot_product_attention(qg, kg, vg).sum().backward()

                    row["sdpa_fwd_bwd"] = timeit(sdpa_fb, **timing)["median_ms"]
                    row["sdpa_fwd_bwd_mem_mb"] = peak_mb(sdpa_fb, device)
            backends = ["triton"] if device.type == "cuda" else ["cumsum", "chunked"]
            for be in backends:
                w = w_norm if be == "cumsum" else w_local
                fwd = lambda: biwkv(kw, vw, w, u, backend=be)  # noqa: E731
                row[f"biwkv_{be}_fwd"] = timeit(fwd, **timing)["median_ms"]
                row[f"biwkv_{be}_fwd_mem_mb"] = peak_mb(fwd, device)
                if args.backward:
                    kg2, vg2 = kw.clone().requires_grad_(), vw.clone().requires_grad_()
                    wg, ug = w.clone().requires_grad_(), u.clone().requires_grad_()

                    def wkv_fb():
                        biwkv(kg2, vg2, wg, ug, backend=be).float().sum().backward()

                    row[f"biwkv_{be}_fwd_bwd"] = timeit(wkv_fb, **timing)["median_ms"]
                    row[f"biwkv_{be}_fwd_bwd_mem_mb"] = peak_mb(wkv_fb, device)
                if "sdpa_fwd" in row:
                    row[f"speedup_{be}_fwd"] = row["sdpa_fwd"] / row[f"biwkv_{be}_fwd"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_call(args, device, dtype, timing):
    rows = []
    grids = GRIDS if device.type == "cuda" else CPU_GRIDS
    for name, (grid, L, H, d, text_first) in grids.items():
        layout = TokenLayout.text_first(grid, L) if text_first else TokenLayout.video_first(grid, L)
        N = layout.seq_len
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, H, N, d, generator=g).to(device, dtype) for _ in range(3))
        kpm = None
        if not text_first:  # HunyuanVideo: padded prompt, 64 valid tokens
            kpm = torch.ones(1, N, dtype=torch.bool, device=device)
            kpm[:, layout.text_offset + 64:] = False
        mask = kpm[:, None, None, :] if kpm is not None else None
        method = FEATMethod(FEATConfig(), [(H, d)]).to(device)
        row = {"layout": name, "grid": grid, "tokens": N, "heads": H, "head_dim": d}
        with torch.no_grad():
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
            row["sdpa_ms"] = timeit(sdpa, **timing)["median_ms"]
            row["feat_ms"] = timeit(lambda: method.feat_attention(q, k, v, layout, kpm, 0), **timing)["median_ms"]
            row["feat_mem_mb"] = peak_mb(lambda: method.feat_attention(q, k, v, layout, kpm, 0), device)
            row["sdpa_mem_mb"] = peak_mb(sdpa, device)
        row["speedup"] = row["sdpa_ms"] / row["feat_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_step(args, device, dtype, timing):
    from step_e2e import build

    from diffusers_attn import remove_attention_acceleration
    from diffusers_attn.api.feat import apply_feat

    out = []
    for name in args.models:
        frames = args.frames or (49 if name == "cogvideox-5b" else 129)
        model, kwargs, desc = build(name, frames, device, dtype, args.smoke)
        if args.smoke:
            desc = "SMOKE (tiny config, CPU; numbers meaningless): " + desc.split("-> ", 1)[1]
        n_layers = len([k for k in model.attn_processors if not k.startswith("context_embedder")])

        def step():
            with torch.no_grad():
                return model(**kwargs).sample

        r = {"model": name, "setting": desc, "rows": []}
        dense = timeit(step, **timing)["median_ms"]
        r["rows"].append({"path": "dense", "median_ms": dense})
        hybrid = tuple(range(0, n_layers, args.hybrid_every))
        hybrid_label = f"FEAT hybrid ({len(hybrid)}/{n_layers} layers softmax)"
        for label, cfg in (("FEAT all layers", FEATConfig()), (hybrid_label, FEATConfig(softmax_layers=hybrid))):
            apply_feat(model, cfg)
            t = timeit(step, **timing)["median_ms"]
            r["rows"].append({"path": label, "median_ms": t, "speedup": dense / t})
            remove_attention_acceleration(model)
        print(json.dumps(r), flush=True)
        out.append(r)
        model = kwargs = None  # free the weights before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=None,
                   help="kernel, call, step (default: all on GPU, kernel+call on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--backward", action="store_true", default=None)
    p.add_argument("--no-backward", dest="backward", action="store_false")
    p.add_argument("--cpu-sdpa-max", type=int, default=8192)
    p.add_argument("--models", nargs="*", default=["cogvideox-5b", "hunyuan-720p"])
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--hybrid-every", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="step part with tiny configs (script check only)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = args.parts or (["kernel", "call", "step"] if device.type == "cuda" else ["kernel", "call"])
    if args.backward is None:
        args.backward = True
    if "step" in parts and device.type != "cuda" and not args.smoke:
        sys.exit("the step part needs a GPU (or --smoke for a script check)")
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    env = environment(device)
    print(f"# {env}\n# {dtype}, median of {args.repeats} after {args.warmup} warm-up")
    res = {"env": env, "dtype": str(dtype)}
    if "kernel" in parts:
        res["kernel"] = bench_kernel(args, device, dtype, timing)
    if "call" in parts:
        res["call"] = bench_call(args, device, dtype, timing)
    if "step" in parts:
        res["step"] = bench_step(args, device, dtype, timing)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
