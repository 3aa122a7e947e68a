"""Generate one video with accelerated attention, on one GPU or many (Ulysses context parallelism).

    python -m diffusers_attn.generate --model THUDM/CogVideoX-5b --prompt "..." --sparsity 0.75 --out fox.mp4
    torchrun --nproc_per_node=4 -m diffusers_attn.generate --model hunyuanvideo-community/HunyuanVideo \\
        --prompt "..." --frames 129 --height 720 --width 1280 --sparsity 0.75 --out fox.mp4

Every rank runs the same pipeline with the same seed; the transformer's video tokens are sharded over the ranks
(``--ulysses``, default: all ranks) and rank 0 alone writes the output and prints the report. ``--sparsity 0`` runs
the dense attention (through the same processors, so the comparison is like for like). Offline tiny models
(``tiny-cogvideox``, ``tiny-hunyuan``) work too, on CPU with the gloo backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .cli import add_rainfusion_args, rainfusion_config_from_args
from .compare import generate, load_pipeline, resolve_device_dtype, write_video
from .install import get_attention_stats
from .parallel import enable_context_parallel
from .pipelines.tiny import TINY_MODELS
from .reference_models import REFERENCE_MODELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusers_attn.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-cogvideox")
    p.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    add_rainfusion_args(p)  # --sparsity 0 = dense attention through the same processors
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: world size)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (fullgraph; the accelerated attention is one custom op)")
    p.add_argument("--out", default="outputs/generate.mp4")
    p.add_argument("--json", default=None)
    p.add_argument("--fps", type=int, default=8)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .api import apply_rainfusion

    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    tiny = args.model in TINY_MODELS or args.model in REFERENCE_MODELS  # small grids: small-model defaults
    use_cuda = torch.cuda.is_available()
    config = rainfusion_config_from_args(args, tiny)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        _, dtype = resolve_device_dtype(device.type, args.dtype)
        loaded = load_pipeline(args.model, device, dtype, seed=args.seed)
        apply_rainfusion(loaded.pipe, config)
        if world > 1:
            enable_context_parallel(loaded.pipe, ulysses_degree=args.ulysses or world)
        if args.compile:
            loaded.pipe.transformer.compile(fullgraph=True)  # in place: the pipeline keeps the same module
        call = dict(loaded.defaults)
        for key, val in (("num_inference_steps", args.steps), ("num_frames", args.frames), ("height", args.height),
                         ("width", args.width), ("guidance_scale", args.guidance_scale)):
            if val is not None:
                call[key] = val
        kwargs = {**loaded.prompt_kwargs(args.prompt, args.negative_prompt), **call}
        t0 = time.perf_counter()
        result = generate(loaded.pipe, kwargs, args.seed, device)
        stats = get_attention_stats(loaded.pipe, log=False)
        if rank == 0:
            path = write_video(args.out, result.frames, fps=args.fps)
            print(f"{args.model}: {world} rank(s), total {result.total_s:.3f} s (denoise {result.denoise_s:.3f} s), "
                  f"sparsity {args.sparsity}; wall {time.perf_counter() - t0:.3f} s")
            print(stats)
            print(f"wrote {path}")
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"model": args.model, "world_size": world, "total_s": result.total_s,
                     "denoise_s": result.denoise_s, "stats": stats.to_dict()}, indent=2, default=str))
                np_path = Path(args.json).with_suffix(".npy")
                np.save(np_path, result.frames)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
