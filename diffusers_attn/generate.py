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
from collections.abc import Sequence
from pathlib import Path

from ._defaults import VIDEO_BUILTIN_MODELS
from .cli import (
    _one_line_errors,
    add_call_args,
    add_rainfusion_args,
    check_call_args,
    one_line,
    progress,
    rainfusion_config_from_args,
)
from .cli_checks import VIDEO_SUFFIXES, check_model, check_out_path, replace_on_success, write_text_replacing

# torch, diffusers and the pipelines are imported by main() once the arguments are checked (--help stays fast).


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusers_attn.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-cogvideox")
    p.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
    p.add_argument("--negative-prompt", default=None)
    add_call_args(p)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    add_rainfusion_args(p)  # --sparsity 0 = dense attention through the same processors
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: world size)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (fullgraph; the accelerated attention is one custom op)")
    p.add_argument("--out", default="outputs/generate.mp4", help="video (replaced only when the run succeeds)")
    p.add_argument("--json", default=None)
    p.add_argument("--fps", type=int, default=8)
    _one_line_errors(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"diffusers-attn generate: error: {one_line(e)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    check_call_args(args)
    check_model(args.model, VIDEO_BUILTIN_MODELS)
    check_out_path("out", args.out, VIDEO_SUFFIXES)
    check_out_path("json", args.json, (".json",))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.ulysses is not None and not (1 <= args.ulysses <= world and world % args.ulysses == 0):
        raise ValueError(f"--ulysses must divide the world size {world}, got {args.ulysses}")
    tiny = args.model in VIDEO_BUILTIN_MODELS  # small grids: small-model defaults
    config = rainfusion_config_from_args(args, tiny)
    if rank == 0:
        progress(f"loading {args.model}")

    import numpy as np
    import torch
    import torch.distributed as dist

    from .api import apply_rainfusion
    from .compare import generate, load_pipeline, resolve_device_dtype, write_video
    from .install import get_attention_stats
    from .parallel import enable_context_parallel

    use_cuda = torch.cuda.is_available()
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
        if rank == 0:
            progress(f"generating ({config.mode}, sparsity {config.sparsity:g})")
        result = generate(loaded.pipe, kwargs, args.seed, device)
        stats = get_attention_stats(loaded.pipe, log=False)
        if rank == 0:
            path = write_video(args.out, result.frames, fps=args.fps)
            print(f"{args.model}: {world} rank(s), total {result.total_s:.3f} s (denoise {result.denoise_s:.3f} s), "
                  f"{config.mode} sparsity {config.sparsity:g}; wall {time.perf_counter() - t0:.3f} s")
            print(stats)
            print(f"wrote {path}")
            if args.json:
                write_text_replacing(args.json, json.dumps(
                    {"model": args.model, "world_size": world, "mode": config.mode, "sparsity": config.sparsity,
                     "total_s": result.total_s, "denoise_s": result.denoise_s, "stats": stats.to_dict()},
                    indent=2, default=str))
                with replace_on_success(Path(args.json).with_suffix(".npy")) as tmp:
                    np.save(tmp, result.frames)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
