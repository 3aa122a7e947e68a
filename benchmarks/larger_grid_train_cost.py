"""What a reference model on a larger latent grid (>= 2k video tokens, so 64/128-token blocks are real) would cost
to train on this CPU: times training steps of the shipped recipe (diffusers_attn/reference_models/train.py: same
architecture, batch, AdamW, EMA, objective) at the shipped grid and at a larger one, and one dense generation, then
extrapolates to the shipped step counts.

    python benchmarks/larger_grid_train_cost.py [--models ref-cogvideox ref-hunyuan] [--frames 9] [--size 64]
        [--steps 4] [--json OUT]

``--size 64`` is a 9 x 16 x 16 latent grid (2304 video tokens, 36 blocks of 64); ``--frames 13`` gives 3328. The
larger-grid variant is registered in :data:`diffusers_attn.reference_models.ARCH` for this process only (same
transformer, ``sample_height/width`` and the pipeline defaults scaled). Nothing is saved. CPU timings on a shared
machine: read them as an order of magnitude.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment

from diffusers_attn.reference_models import ARCH, REFERENCE_MODELS, build_reference_pipeline
from diffusers_attn.reference_models.data import sample_batch
from diffusers_attn.reference_models.train import caption_embeddings, encode_batch, noisy_inputs, rotary

#: steps the shipped models were trained for (their train_log.json: 1966 and 1600 steps at batch 8)
SHIPPED_STEPS = {"ref-cogvideox": 1966, "ref-hunyuan": 1600}


def variant(name: str, frames: int, size: int) -> str:
    """Register (for this process) ``name`` at ``frames`` x ``size`` px; returns the variant's name."""
    if (frames, size) == (ARCH[name]["frames"], ARCH[name]["size"]):
        return name
    arch = copy.deepcopy(ARCH[name])
    arch.update(frames=frames, size=size)
    if arch["family"] == "cogvideox":
        arch["transformer"].update(sample_width=size // 2, sample_height=size // 2, sample_frames=frames)
    arch["defaults"].update(height=size, width=size, num_frames=frames)
    new = f"{name}@{frames}x{size}"
    ARCH[new] = arch
    return new


def time_steps(name: str, steps: int, batch: int) -> dict:
    """Seconds per training step of the shipped recipe (after one untimed step) and per dense generation."""
    torch.manual_seed(0)
    arch = ARCH[name]
    spec = build_reference_pipeline(name, pretrained=False, seed=0)
    model = spec.pipe.transformer
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.99))
    rope = rotary(spec, arch, arch["frames"], torch.device("cpu")) if spec.family == "cogvideox" else None
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        videos, captions = sample_batch(step, batch, arch["frames"], arch["size"])
        x0 = encode_batch(spec, videos)
        text = caption_embeddings(spec, captions, torch.rand(batch, generator=g) < 0.1)
        xt, t, target = noisy_inputs(spec, x0, g)
        extra = {"image_rotary_emb": rope} if spec.family == "cogvideox" else {}
        pred = model(hidden_states=xt, timestep=t, return_dict=False, **extra, **text)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(0.995).add_(v.detach(), alpha=0.005)
        if step:  # the first step pays one-time allocation
            times.append(time.perf_counter() - t0)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        spec.pipe(**spec.prompt_kwargs("red square moves right over checker"), **spec.defaults, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    gen_s = time.perf_counter() - t0
    grid = (arch["frames"], arch["size"] // 4, arch["size"] // 4)
    return {"model": name, "grid": grid, "video_tokens": grid[0] * grid[1] * grid[2], "batch": batch,
            "step_s": sorted(times)[len(times) // 2], "step_s_all": times, "generation_s": gen_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=64, help="pixels (latent grid side = size / 4)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the shipped models were trained
    rows = []
    print("| model | latent grid | video tokens | s / training step (batch 8) | s / dense generation (16 steps, CFG) | "
          "shipped step count | extrapolated training time |\n|---|---|---:|---:|---:|---:|---:|")
    for base in args.models:
        for frames, size in ((ARCH[base]["frames"], ARCH[base]["size"]), (args.frames, args.size)):
            r = time_steps(variant(base, frames, size), args.steps, args.batch)
            r["shipped_steps"] = SHIPPED_STEPS.get(base)
            r["extrapolated_h"] = r["step_s"] * r["shipped_steps"] / 3600
            rows.append(r)
            print(f"| {base} | {' x '.join(map(str, r['grid']))} | {r['video_tokens']} | {r['step_s']:.2f} | "
                  f"{r['generation_s']:.1f} | {r['shipped_steps']} | {r['extrapolated_h']:.2f} h |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment(torch.device("cpu")), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
