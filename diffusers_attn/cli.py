"""``diffusers-attn`` command line.

    diffusers-attn compare [--model M] [--sparsity S] [--steps N] [--seed S] [--out PATH] ...

runs a pipeline dense and with RainFusion using the same seed, writes a side-by-side mp4 and prints latency,
speedup, PSNR/SSIM between the two outputs and the realized attention density.

    diffusers-attn plan --model hunyuanvideo --sparsity 0.75 [--frames F --height H --width W] [--json OUT]

prints, from shapes alone (no weights, no GPU), the densities RainFusion executes on a real model's grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .model_shapes import MODEL_SHAPES, get_model_shape, resolve_video  # standard library only

# The command handlers import what they run (torch, diffusers, the pipelines) inside themselves: building the
# parser, e.g. for ``diffusers-attn --help``, needs none of it.

DEFAULT_PROMPT = "a red fox running through fresh snow at sunrise"


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="dense vs RainFusion on one prompt: side-by-side mp4, latency, PSNR/SSIM, density",
        description="Run a pipeline dense and with RainFusion (same seed), write a side-by-side video and report "
        "latency, speedup, fidelity and realized density. The default model is ref-cogvideox, a small CogVideoX "
        "trained on procedural moving shapes and shipped with the package (runs offline on a CPU in seconds); "
        "the tiny-* models have random weights (plumbing only: their outputs say nothing about quality).",
    )
    p.add_argument("--model", default="ref-cogvideox",
                   help="ref-cogvideox (trained, default) | ref-hunyuan | tiny-cogvideox | tiny-cogvideox-1.5 | "
                   "tiny-hunyuan | tiny-opensora | tiny-wan | tiny-wan2.2 | tiny-hunyuanvideo-1.5 | a diffusers hub id or local folder")
    p.add_argument("--prompt", default=None,
                   help=f"default: the reference models' '<colour> <shape> <motion> over <background>' caption, "
                   f"else {DEFAULT_PROMPT!r}")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (tiny default 8, else 50)")
    p.add_argument("--frames", type=int, default=None, help="number of frames")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    add_rainfusion_args(p)
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up runs before timing")
    p.add_argument("--out", default="outputs/compare.mp4", help="side-by-side mp4 path")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--fps", type=int, default=8)
    p.set_defaults(func=_cmd_compare)


def add_rainfusion_args(p: argparse.ArgumentParser) -> None:
    """The RainFusion knobs shared by ``compare`` and ``python -m diffusers_attn.generate``."""
    g = p.add_argument_group("RainFusion")
    g.add_argument("--sparsity", type=float, default=0.75)
    g.add_argument("--dense-steps", type=_dense_steps_value, default=0.25,
                   help="dense warm-up: a fraction of the run (0.25) or a number of steps (3)")
    g.add_argument("--dense-layers", type=int, default=1)
    g.add_argument("--arm-threshold", type=float, default=0.9)
    g.add_argument("--min-video-tokens", type=int, default=None,
                   help="dense below this many video tokens (library default 4096; 0 for the tiny models)")
    g.add_argument("--block-m", type=int, default=None, help="query block (default 128; 16 for the tiny models)")
    g.add_argument("--block-n", type=int, default=None, help="key block (default 64; 16 for the tiny models)")
    g.add_argument("--force-pattern", default=None, choices=["spatial", "temporal", "textural", "dense"])


def rainfusion_config_from_args(args: argparse.Namespace, tiny: bool):
    """``RainFusionConfig`` from :func:`add_rainfusion_args` options (validated before anything loads)."""
    from .methods.rainfusion import RainFusionConfig

    return RainFusionConfig(
        sparsity=args.sparsity,
        dense_steps=args.dense_steps,
        dense_layers=args.dense_layers,
        arm_threshold=args.arm_threshold,
        min_video_tokens=args.min_video_tokens if args.min_video_tokens is not None else (0 if tiny else 4096),
        block_m=args.block_m or (16 if tiny else 128),
        block_n=args.block_n or (16 if tiny else 64),
        force_pattern=args.force_pattern,
    )


def _dense_steps_value(text: str) -> int | float:
    """"3" means 3 steps; "0.25" (or "1.0") a fraction of the run."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or a fraction, got {text!r}") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    from .api import apply_rainfusion
    from .compare import load_pipeline, resolve_device_dtype, run_comparison, side_by_side_frames, write_video
    from .pipelines.tiny import TINY_MODELS, TINY_VAR_MODELS
    from .reference_models import REFERENCE_MODELS
    from .reference_models.var import DEFAULT_CLASS_LABELS, REFERENCE_VAR_MODELS

    if args.model in TINY_VAR_MODELS or args.model in REFERENCE_VAR_MODELS:
        raise ValueError(
            f"--model {args.model} is a class-conditional VAR model; `compare` runs RainFusion on text-to-video "
            "models. Compare LiteVAR against dense in the demo (`diffusers-attn demo`, method LiteVAR, model "
            f"{args.model}) or from Python: diffusers_attn.demo.DemoRunner().run(DemoRequest(model='{args.model}', "
            f"method='litevar', prompt='{DEFAULT_CLASS_LABELS}'))"
        )
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    reference = args.model in REFERENCE_MODELS
    tiny = args.model in TINY_MODELS or reference  # small latent grids: same RainFusion size defaults
    config = rainfusion_config_from_args(args, tiny)  # validated before anything heavy loads
    loaded = load_pipeline(args.model, device, dtype, seed=args.seed)
    call = dict(loaded.defaults)
    for key, val in (("num_inference_steps", args.steps), ("num_frames", args.frames), ("height", args.height),
                     ("width", args.width), ("guidance_scale", args.guidance_scale)):
        if val is not None:
            call[key] = val
    call.setdefault("num_inference_steps", 50)
    note = None
    prompt = args.prompt or loaded.default_prompt or DEFAULT_PROMPT
    if reference:
        note = ("trained reference model (procedural moving shapes, 9 latent frames x 8 x 8 tokens): "
                "min_video_tokens=0 and 16-token blocks so the sparse path runs at this size. Timings at this size "
                "measure overheads, not attention speed.")
    elif tiny:
        note = ("tiny random-weight model: it has no learned attention structure, so its ARM decisions and "
                "fidelity figures check the plumbing, not quality; min_video_tokens=0 and 16-token blocks so the "
                "sparse path runs at all. Timings at this size measure overheads, not attention speed.")
    result = run_comparison(
        loaded, lambda pipe: apply_rainfusion(pipe, config), method_name="rainfusion",
        prompt=prompt, negative_prompt=args.negative_prompt, call_kwargs=call, seed=args.seed,
        device=device, warmup=not args.no_warmup, note=note,
    )
    print(result.report())
    print(result.stats)
    frames = side_by_side_frames(
        result.dense.frames, result.accelerated.frames,
        ("dense", f"RainFusion s={config.sparsity:g} ({result.speedup:.2f}x)"),
    )
    path = write_video(args.out, frames, fps=args.fps)
    print(f"wrote {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _add_convert_opensora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-opensora",
        help="convert Open_Sora_v2.safetensors to a diffusers OpenSoraPipeline folder",
        description="Convert the official Open-Sora 2.0 MMDiT checkpoint (streamed tensor by tensor) into "
        "ORIGINAL -> OUTDIR/transformer, plus scheduler/ and model_index.json; --vae, --t5 and --clip add those "
        "components (e.g. from a local copy of hpcai-tech/Open-Sora-v2). Load with "
        "OpenSoraPipeline.from_pretrained(OUTDIR, ...), passing any component left out.",
    )
    p.add_argument("original", help="path of Open_Sora_v2.safetensors")
    p.add_argument("outdir", help="output folder (created)")
    p.add_argument("--vae", default=None, help="hunyuan_vae.safetensors (loaded strictly into AutoencoderKLHunyuanVideo)")
    p.add_argument("--t5", default=None, help="folder or hub id of google/t5-v1_1-xxl (tokenizer + encoder)")
    p.add_argument("--clip", default=None, help="folder or hub id of openai/clip-vit-large-patch14")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="weight dtype to write (default: as stored, bf16 in the release)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--axes-dims-rope", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="RoPE dims per axis; only for head dims other than the release's 128 (16 56 56)")
    p.set_defaults(func=_cmd_convert_opensora)


def _cmd_convert_opensora(args: argparse.Namespace) -> int:
    import torch

    from .pipelines.opensora.convert import convert_opensora_v2_to_diffusers

    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out = convert_opensora_v2_to_diffusers(
        args.original, args.outdir, vae=args.vae, t5=args.t5, clip=args.clip, dtype=dtype,
        max_shard_size=args.max_shard_size,
        config_overrides={"axes_dims_rope": tuple(args.axes_dims_rope)} if args.axes_dims_rope else None,
    )
    missing = [name for name, given in (("vae", args.vae), ("text encoder (T5)", args.t5),
                                        ("text encoder 2 (CLIP)", args.clip)) if not given]
    print(f"wrote {out}")
    if missing:
        print(f"not included (pass them to OpenSoraPipeline.from_pretrained or rerun with the option): "
              f"{', '.join(missing)}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="Gradio side-by-side page: dense vs accelerated, same seed (needs the [demo] extra)",
        description="Launch the Gradio side-by-side demo. It binds to 127.0.0.1 unless --host says otherwise; "
        "--share (a public Gradio link) is an explicit opt-in.",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--share", action="store_true", help="also open a public share link (off by default)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise RuntimeError('the demo needs Gradio: pip install "diffusers-attn[demo]"') from None
    from .demo import DemoRunner, launch_demo

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    launch_demo(host=args.host, port=args.port, share=args.share, runner=DemoRunner(args.device, args.dtype))
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    names = " | ".join(MODEL_SHAPES)
    p = sub.add_parser(
        "plan",
        help="shape-only RainFusion report for a real model: executed density and a speedup bound (no weights)",
        description="Build the RainFusion plan of a real model's attention shape (no weights, no GPU: seconds on "
        "a CPU) and print the executed video and all-token densities of each pattern next to the nominal "
        "1 - sparsity, the always-dense first-frame share and a density-only bound on the whole-run attention "
        "speedup under the default schedule (25% dense warm-up steps, first layer dense).",
    )
    p.add_argument("--model", required=True, metavar="NAME", help=names)
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the family's)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the family's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the family's)")
    p.add_argument("--sparsity", type=float, required=True, help="RainFusion sparsity in [0, 1)")
    p.add_argument("--mode", default="rf1", choices=["rf1", "rf2"], help="rf1 patterns or rf2 block top-k")
    p.add_argument("--token-order", default="raster", choices=["raster", "tiles"],
                   help="video token order the plan runs in (tiles: spatio-temporal tiles, see RainFusionConfig)")
    p.add_argument("--block-m", type=int, default=128, help="query block (default 128)")
    p.add_argument("--block-n", type=int, default=64, help="key block (default 64)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the schedule (default 50)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    p.set_defaults(func=_cmd_plan)
    _one_line_errors(p)


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    """Usage mistakes on one stderr line, exit 2, as the handlers' own errors (the usage is in --help)."""

    def error(message: str) -> None:
        p.exit(2, f"{p.prog}: error: {message}\n")

    p.error = error  # type: ignore[method-assign]


def _cmd_plan(args: argparse.Namespace) -> int:
    shape = get_model_shape(args.model)
    video = resolve_video(shape, args.frames, args.height, args.width)
    # The cheap checks before the header; plan_report validates everything again through RainFusionConfig.
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    for name in ("block_m", "block_n", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    print("\n".join(shape.describe(*video)), flush=True)  # the grid before torch loads and the plan builds

    from .plan_report import format_plan_table, plan_report

    report = plan_report(args.model, *video, sparsity=args.sparsity, mode=args.mode, block_m=args.block_m,
                         block_n=args.block_n, steps=args.steps, token_order=args.token_order)
    print(format_plan_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-attn", description="faster attention for diffusers pipelines")
    parser.add_argument("-v", "--verbose", action="store_true", help="INFO logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compare(sub)
    _add_convert_opensora(sub)
    _add_demo(sub)
    _add_eval(sub)
    _add_plan(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as e:
        # Bad input gets one readable line; -v shows the traceback.
        if args.verbose:
            raise
        print(f"diffusers-attn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
