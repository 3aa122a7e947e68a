"""VAR + LiteVAR end to end: load (or randomly build) a VAR model, calibrate masks, sample dense and LiteVAR
images with the same seed, save both side by side and print the attention stats.

    python demos/var_litevar.py --checkpoints /path/with/pth --depth 16 --out outputs/var   # released weights
    python demos/var_litevar.py --depth 16 --random                                        # random weights

With released weights, PSNR between the dense and LiteVAR images is printed (same seed, same tokens until the
first divergence). With random weights the images are noise and say nothing about quality.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_attn import (  # noqa: E402
    VQVAE,
    LiteVARConfig,
    LiteVARMaskSet,
    VARPipeline,
    VARTransformer,
    apply_litevar,
    calibrate_litevar,
    get_attention_stats,
    remove_litevar,
)
from diffusers_attn.eval.metrics import psnr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", help="folder with vae_ch160v4096z32.pth and var_d{depth}.pth")
    ap.add_argument("--random", action="store_true", help="random weights (no files needed)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--labels", type=int, nargs="+", default=[207, 360])
    ap.add_argument("--calib-labels", type=int, nargs="+", default=list(range(0, 1000, 125)))
    ap.add_argument("--masks", help="load masks from this .safetensors instead of calibrating")
    ap.add_argument("--quant", default="w8a8", help="None, w8a8, w6a6, w4a8, w4a6, w4a4, int8 (CUDA)")
    ap.add_argument("--no-share", action="store_true", help="disable CFG attention sharing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="outputs/var")
    args = ap.parse_args()
    if not args.random and not args.checkpoints:
        ap.error("give --checkpoints DIR or --random")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.random:
        torch.manual_seed(0)
        pipe = VARPipeline(VARTransformer.for_depth(args.depth).eval(), VQVAE().eval())
    else:
        pipe = VARPipeline.from_var_checkpoint(os.path.join(args.checkpoints, "vae_ch160v4096z32.pth"),
                                               os.path.join(args.checkpoints, f"var_d{args.depth}.pth"),
                                               depth=args.depth)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def sample():
        return pipe(args.labels, guidance_scale=4.0, top_k=900, top_p=0.95, output_type="pt",
                    generator=torch.Generator(device).manual_seed(0)).images

    dense = sample()
    if args.masks:
        masks = LiteVARMaskSet.load(args.masks)
    else:
        litevar_lists = pipe.transformer.num_heads in (16, 30)
        masks = calibrate_litevar(pipe, args.calib_labels, candidate_widths="litevar" if litevar_lists else "all")
        masks.save(out / f"masks_d{args.depth}.safetensors")
    print("mask summary (per scale):", masks.summary())
    quant = None if args.quant.lower() == "none" else args.quant
    apply_litevar(pipe, LiteVARConfig(masks=masks, share_cfg_attention=not args.no_share, quant=quant))
    lite = sample()
    print(get_attention_stats(pipe, log=False).info["kept_attention_share_per_scale"])
    if not args.random:
        vals = [round(float(psnr(a[None].float().cpu(), b[None].float().cpu())), 2) for a, b in zip(dense, lite)]
        print("PSNR dense vs LiteVAR (dB):", vals)
    remove_litevar(pipe)
    from PIL import Image

    grid = torch.cat([torch.cat(list(dense), 2), torch.cat(list(lite), 2)], 1)  # top: dense, bottom: LiteVAR
    arr = (grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(out / "dense_vs_litevar.png")
    print("saved", out / "dense_vs_litevar.png")


if __name__ == "__main__":
    main()
