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
from diffusers_attn import LiteVARConfig, LiteVARMaskSet, VARPipeline, VARTransformer, VQVAE, apply_litevar  # noqa: E402
from diffusers_attn import get_attention_stats, remove_litevar  # noqa: E402
from diffusers_attn.processors.litevar import default_maskable  # noqa: E402


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


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reduced = device.type != "cuda" or args.reduced
    results = []
    for depth in args.depths:
        pipe = build(depth, device, dtype, reduced, args)
        tr = pipe.transformer
        fl = analytic_flops(depth, tr.C, tr.patch_nums)
        masks = synthetic_masks(tr, args.mask_width_frac)
        variants = {
            "dense": None,
            "masks": LiteVARConfig(masks=masks),
            "cfg_share": LiteVARConfig(share_cfg_attention=True),
            "w8a8_fake": LiteVARConfig(quant="w8a8"),
        }
        if device.type == "cuda":
            variants["int8"] = LiteVARConfig(quant="int8")
            variants["combined_int8"] = LiteVARConfig(masks=masks, share_cfg_attention=True, quant="int8")
        else:
            variants["combined_fake"] = LiteVARConfig(masks=masks, share_cfg_attention=True, quant="w8a8")
        for name, cfg in variants.items():
            if name.endswith("int8"):
                pipe = build(depth, device, dtype, reduced, args)  # int8 conversion is one-way: fresh model
            if cfg is not None:
                apply_litevar(pipe, cfg)
            for B in args.batches:
                labels = [(7 * i) % 1000 for i in range(B)]

                def sample(output_type: str):
                    g = torch.Generator(device).manual_seed(0)
                    return pipe(labels, guidance_scale=4.0, top_k=900, top_p=0.95, generator=g, output_type=output_type)

                cuda = device.type == "cuda"
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t_lat = timeit(lambda: sample("latent"), device, warmup=args.warmup, repeats=args.repeats)
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t_img = timeit(lambda: sample("pt"), device, warmup=0, repeats=args.repeats)
                peak_img = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                row = {
                    "depth": depth, "width": tr.C, "batch": B, "variant": name,
                    "ms_per_image_no_decode": t_lat["median_ms"] / B, "ms_per_image_with_decode": t_img["median_ms"] / B,
                    "p20_p80_no_decode_ms": [t_lat["p20_ms"] / B, t_lat["p80_ms"] / B],
                    "peak_mem_GiB_no_decode": peak, "peak_mem_GiB_with_decode": peak_img, "attention_flop_share": fl["attention_share"],
                }
                if cfg is not None:
                    st = get_attention_stats(pipe, log=False)
                    row["kept_attention_share_per_scale"] = st.info.get("kept_attention_share_per_scale")
                    row["computed_score_share_per_scale"] = st.info.get("computed_score_share_per_scale")
                    row["quantized_layers"] = len(st.info.get("quantized_layers") or [])
                results.append(row)
                print(json.dumps(row), flush=True)
            if cfg is not None and not name.endswith("int8"):
                remove_litevar(pipe)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


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
    ap.add_argument("--reduced-width", type=int, default=256)
    ap.add_argument("--reduced-vae-ch", type=int, default=32)
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.depths = args.depths or ([16, 30] if cuda else [4])
    args.batches = args.batches or ([1, 16] if cuda else [1, 4])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(torch.device(args.device))
    print(json.dumps({"env": env, "args": vars(args)}), flush=True)
    for d in args.depths:
        with torch.device("meta"):
            tr = VARTransformer.for_depth(d) if d in (16, 20, 24, 30) else None
        if tr is not None:
            print(json.dumps({"analytic_flops_full_size": {"depth": d, **analytic_flops(d, tr.C, tr.patch_nums)}}))
    res = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "results": res}, indent=1))


if __name__ == "__main__":
    main()
