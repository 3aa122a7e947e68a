"""LiteVAR vs dense on the trained reference VAR (``ref-var``): which LiteVAR settings keep PSNR high.

    python benchmarks/var_reference_quality.py [--guidance 1.0 2.0] [--seeds 0 1]

Per guidance scale: masks calibrated at that scale, then each configuration vs dense with the same generator
(all 36 classes): PSNR of sampled runs (per seed) and greedy (top_k=1), and the max flip-free KL over scales
(guided logits on dense's token prefix). CPU is enough (130 tokens); on a GPU add ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json

import torch

from diffusers_attn.api.litevar import apply_litevar, remove_litevar
from diffusers_attn.methods.litevar import LiteVARConfig
from diffusers_attn.reference_models.var import load_reference_var_pipeline
from diffusers_attn.reference_models.var import quality as Q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_reference_var_pipeline(device=args.device)
    labels = Q.EVAL_LABELS
    rows = []
    for g in args.guidance:
        m = Q.calibrate(pipe, call={"guidance_scale": g})
        configs = {
            "masks": dict(masks=m), "w8a8": dict(quant="w8a8"), "asc all scales": dict(share_cfg_attention=True),
            "asc last scale": dict(share_cfg_attention=True, share_cfg_scales=(5,)),
            "asc last 2 scales": dict(share_cfg_attention=True, share_cfg_scales=(4, 5)),
            "all (asc all scales)": dict(masks=m, quant="w8a8", share_cfg_attention=True),
            "all (asc last scale)": dict(masks=m, quant="w8a8", share_cfg_attention=True, share_cfg_scales=(5,)),
        }
        for name, cfg in configs.items():
            row = {"guidance": g, "config": name}
            for seed in args.seeds:
                for mode, kw in ((f"seed{seed}", {}), ("greedy", {"top_k": 1})):
                    if mode == "greedy" and seed != args.seeds[0]:
                        continue
                    d = Q.sample(pipe, labels, seed, guidance_scale=g, **kw)
                    apply_litevar(pipe, LiteVARConfig(**cfg))
                    try:
                        f = Q.sample(pipe, labels, seed, guidance_scale=g, **kw)
                    finally:
                        remove_litevar(pipe)
                    row[mode] = Q.compare(d, f)["psnr_db"]
            _, ids = Q.sample(pipe, labels, args.seeds[0], guidance_scale=g)
            dl = Q.guided_logits_on_prefix(pipe, labels, ids, g)
            apply_litevar(pipe, LiteVARConfig(**cfg))
            try:
                fl = Q.guided_logits_on_prefix(pipe, labels, ids, g)
            finally:
                remove_litevar(pipe)
            row["max_kl"] = round(max(Q.logit_fidelity(dl, fl)["kl_per_scale"]), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k not in ("guidance", "config")]
    print("\n| guidance | configuration | " + " | ".join(f"PSNR {k} (dB)" if k != "max_kl" else "max KL" for k in keys)
          + " |")
    print("|---|---|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['guidance']} | {r['config']} | " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
