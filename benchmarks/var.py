"""VAR sampling: dense vs LiteVAR parts (masks, CFG sharing, fake-quant, real int8) and combined.

GPU (default when CUDA is present): full-size VAR-d16 and d30 with random weights (no download), 256 px,
batch 1 and 16, bf16. CPU (``--device cpu``): reduced sizes (see ``--reduced-*``), fp32.

Reports per variant: latency per image with and without the VQVAE decode, peak CUDA memory, the kept attention
share per scale, and the analytic attention share of transformer FLOPs (so the report is honest about where
savings can come from). Masks are **synthetic** (band width = ``--mask-width-frac`` of each maskable segment): with
random weights calibration says nothing about real models; speed depends only on the mask layout. Quality is
never measured here (random weights).

    python benchmarks/var.py                                   # GPU: d16 + d30, batch 1 and 16
    python benchmarks/var.py --device cpu --depths 4 --batches 1 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import environment, timeit  # noqa: E402
from diffusers_attn import (  # noqa: E402
    VQVAE,
    LiteVARConfig,
    LiteVARMaskSet,
    VARPipeline,
    VARTransformer,
    apply_litevar,
    get_attention_stats,  # noqa: E402
)
from diffusers_attn.methods.litevar import DEFAULT_PATCH_NUMS as DEFAULT_PN  # noqa: E402
from diffusers_attn.methods.litevar import default_maskable


def analytic_flops(depth: int, C: int, patch_nums, V: int = 4096, Cvae: int = 32) -> dict[str, float]:
    """FLOPs (2 x MAC) per image and CFG branch of the transformer (derived, spec C)."""
    L = sum(p * p for p in patch_nums)
    ends, cum = [], 0
    for p in patch_nums:
        cum += p * p
        ends.append(cum)
    pairs = sum(p * p * e for p, e in zip(patch_nums, ends))
    linear = 2 * L * 12 * C * C * depth + 2 * L * Cvae * C
    attn = 4 * pairs * C * depth  # QK^T and PV
    head = 2 * L * C * V + 2 * len(patch_nums) * C * 2 * C
    adaln = 2 * len(patch_nums) * C * 6 * C * depth
    total = linear + attn + head + adaln
    return {"total_G": total / 1e9, "linear_G": linear / 1e9, "attention_G": attn / 1e9,
            "attention_share": attn / total, "head_G": head / 1e9, "adaln_G": adaln / 1e9}


def synthetic_masks(tr: VARTransformer, frac: float) -> LiteVARMaskSet:
    pn = tuple(tr.patch_nums)
    lay = default_maskable(pn)
    widths = {k: torch.tensor([max(1, math.ceil(frac * pn[s] ** 2)) for s in segs]).expand(len(tr.blocks), tr.num_heads, -1).clone()
              for k, segs in lay.items()}
    return LiteVARMaskSet(pn, len(tr.blocks), tr.num_heads, widths, lay, {"kind": f"synthetic band {frac}"})


def build(depth: int, device: torch.device, dtype: torch.dtype, reduced: bool, args) -> VARPipeline:
    torch.manual_seed(0)
    with torch.device(device):
        if reduced:
            tr = VARTransformer(depth=depth, embed_dim=args.reduced_width, num_heads=args.reduced_width // 64)
            vq = VQVAE(ch=args.reduced_vae_ch)
        else:
            tr = VARTransformer.for_depth(depth)
            vq = VQVAE()
    pipe = VARPipeline(tr.eval(), vq.eval())
    if dtype != torch.float32:
        pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_bytes(pipe: VARPipeline) -> int:
    return sum(t.numel() * t.element_size() for m in (pipe.transformer, pipe.vqvae)
               for t in list(m.parameters()) + list(m.buffers()))


def run(args) -> list[dict]:
    """All variants of one depth are resident at once and timed round-robin (one run of each per repeat), so slow
    drift of a shared machine hits every variant alike. Peak memory of a variant = its own weights + the peak
    extra allocation of its call (other variants' resident weights are not counted)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reduced = args.reduced or (not cuda and not args.full)
    results = []
    for depth in args.depths:
        base = build(depth, device, dtype, reduced, args)
        tr = base.transformer
        fl = analytic_flops(depth, tr.C, tr.patch_nums)
        masks = synthetic_masks(tr, args.mask_width_frac)
        configs = {
            "dense": None,
            "masks": LiteVARConfig(masks=masks),
            "cfg_share": LiteVARConfig(share_cfg_attention=True),
            "w8a8_fake": LiteVARConfig(quant="w8a8"),
        }
        if cuda:
            configs["int8"] = LiteVARConfig(quant="int8")
            configs["combined_int8"] = LiteVARConfig(masks=masks, share_cfg_attention=True, quant="int8")
        else:
            configs["combined_fake"] = LiteVARConfig(masks=masks, share_cfg_attention=True, quant="w8a8")
        if args.variants:
            configs = {k: v for k, v in configs.items() if k in args.variants}
        pipes = {}
        for name, cfg in configs.items():
            pipe = base if name == "dense" else build(depth, device, dtype, reduced, args)
            if cfg is not None:
                apply_litevar(pipe, cfg)
            pipes[name] = pipe
        for B in args.batches:
            labels = [(7 * i) % 1000 for i in range(B)]

            def call(pipe: VARPipeline, output_type: str):
                g = torch.Generator(device).manual_seed(0)
                out = pipe(labels, guidance_scale=4.0, top_k=900, top_p=0.95, generator=g, output_type=output_type)
                if cuda:
                    torch.cuda.synchronize()
                return out

            peaks = {}
            for name, pipe in pipes.items():  # warm-up + peak memory, one variant at a time
                for _ in range(args.warmup):
                    call(pipe, "pt")
                for ot in ("latent", "pt"):
                    if cuda:
                        torch.cuda.synchronize()
                        before = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    call(pipe, ot)
                    if cuda:
                        peaks[(name, ot)] = (torch.cuda.max_memory_allocated() - before + _model_bytes(pipe)) / 2**30
            times = {(n, ot): [] for n in pipes for ot in ("latent", "pt")}
            for _ in range(args.repeats):
                for name, pipe in pipes.items():
                    for ot in ("latent", "pt"):
                        times[(name, ot)].append(timeit(lambda: call(pipe, ot), device, warmup=0, repeats=1)["median_ms"])
            for name, pipe in pipes.items():
                lat, img = sorted(times[(name, "latent")]), sorted(times[(name, "pt")])
                med = lambda t: t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2  # noqa: E731
                row = {
                    "depth": depth, "width": tr.C, "batch": B, "variant": name,
                    "ms_per_image_no_decode": med(lat) / B, "ms_per_image_with_decode": med(img) / B,
                    "min_ms_per_image_no_decode": lat[0] / B, "min_ms_per_image_with_decode": img[0] / B,
                    "peak_mem_GiB_no_decode": peaks.get((name, "latent")),
                    "peak_mem_GiB_with_decode": peaks.get((name, "pt")),
                    "weights_GiB": _model_bytes(pipe) / 2**30, "attention_flop_share": fl["attention_share"],
                }
                if configs[name] is not None:
                    st = get_attention_stats(pipe, log=False)
                    row["kept_attention_share_per_scale"] = st.info.get("kept_attention_share_per_scale")
                    row["computed_score_share_per_scale"] = st.info.get("computed_score_share_per_scale")
                    row["quantized_layers"] = len(st.info.get("quantized_layers") or [])
                results.append(row)
                print(json.dumps(row), flush=True)
        del pipes, base, pipe
        if cuda:
            torch.cuda.empty_cache()
    return results


@torch.no_grad()
def correctness_checks(args) -> bool:
    """Before timing: at the benchmark's sizes and dtype, (a) the KV-cached incremental forward matches the
    teacher-forced one, dense and with masks (bf16 tolerance), (b) real int8 (CUDA) and W8A8 fake-quant logits stay
    close to the model's own logits. Prints relative errors; returns False on a failure."""
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reduced = args.reduced or (device.type != "cuda" and not args.full)
    depth = args.depths[0]
    ok = True

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

    def incremental(tr, labels, teacher):
        cond = tr.class_cond(labels)
        x = tr.first_input(cond)
        lvl = tr.lvl_pos()
        out = []
        tr.kv_caching(True)
        for si, (bg, ed) in enumerate(tr.begin_ends):
            out.append(tr.get_logits(tr.run_blocks(x, cond, None, scale_idx=si, cfg_batch=False), cond))
            if si + 1 < len(tr.begin_ends):
                nb, ne = tr.begin_ends[si + 1]
                x = tr.word_embed(teacher[:, nb - 1 : ne - 1]) + lvl[:, nb:ne]
        tr.kv_caching(False)
        return torch.cat(out, 1)

    pipe = build(depth, device, dtype, reduced, args)
    tr = pipe.transformer
    g = torch.Generator(device).manual_seed(0)
    ids = [torch.randint(0, tr.vocab_size, (2, pn * pn), generator=g, device=device) for pn in tr.patch_nums]
    teacher = pipe.vqvae.quantize.idx_to_var_input(ids).to(dtype)
    labels = torch.tensor([207, 360], device=device)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ref = tr(labels, teacher)
    for name, cfg in (("dense", None), ("masks", LiteVARConfig(masks=synthetic_masks(tr, args.mask_width_frac)))):
        if cfg is not None:
            apply_litevar(pipe, cfg)
        e = rel(incremental(tr, labels, teacher), tr(labels, teacher))
        good = e <= tol and math.isfinite(e)
        ok &= good
        print(json.dumps({"check": f"kv_cache_vs_teacher_forced[{name}]", "rel_err": e, "tol": tol, "ok": good}))
    from diffusers_attn import remove_litevar

    remove_litevar(pipe)
    quants = ["w8a8"] + (["int8"] if device.type == "cuda" else [])
    for q in quants:
        apply_litevar(pipe, LiteVARConfig(quant=q))
        e = rel(tr(labels, teacher), ref)
        good = e <= 0.25 and math.isfinite(e)  # sanity bound on random weights (d16 W8A8, CPU: 0.074)
        ok &= good
        print(json.dumps({"check": f"logits_vs_unquantized[{q}]", "rel_err": e, "ok": good}))
        if q != "int8":
            remove_litevar(pipe)
    del pipe
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depths", type=int, nargs="+", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mask-width-frac", type=float, default=0.25)
    ap.add_argument("--reduced", action="store_true", help="reduced sizes on GPU too")
    ap.add_argument("--full", action="store_true", help="full sizes on CPU too (slow)")
    ap.add_argument("--reduced-width", type=int, default=256)
    ap.add_argument("--reduced-vae-ch", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=None, help="subset of variants (default: all)")
    ap.add_argument("--skip-checks", action="store_true", help="skip the correctness checks run before timing")
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.depths = args.depths or ([16, 30] if cuda or args.full else [4])
    args.batches = args.batches or ([1, 16] if cuda else [1, 4])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(torch.device(args.device))
    print(json.dumps({"env": env, "args": vars(args)}), flush=True)
    for d in (16, 20, 24, 30):  # the released 256-px models, whatever is timed below
        print(json.dumps({"analytic_flops_full_size": {"depth": d, **analytic_flops(d, 64 * d, DEFAULT_PN)}}))
    if not args.skip_checks and not correctness_checks(args):
        print("correctness checks FAILED: timings would be meaningless", file=sys.stderr)
        sys.exit(1)
    res = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "results": res}, indent=1))


if __name__ == "__main__":
    main()
