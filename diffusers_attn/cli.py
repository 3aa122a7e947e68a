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

from ._defaults import (  # standard library only, as are the two below
    DEFAULT_MODE,
    DEFAULT_SPARSITY,
    RAINFUSION_MODES,
    SMALL_GRID,
    VAR_BUILTIN_MODELS,
    VIDEO_BUILTIN_MODELS,
)
from .cli_checks import (
    VIDEO_SUFFIXES,
    UsageError,
    check_device,
    check_dtype,
    check_float,
    check_int,
    check_model,
    check_out_path,
    check_video_size,
    write_text_replacing,
)
from .model_shapes import MODEL_SHAPES, get_model_shape, resolve_video

# The command handlers import what they run (torch, diffusers, the pipelines) inside themselves: building the
# parser, e.g. for ``diffusers-attn --help``, needs none of it.

DEFAULT_PROMPT = "a red fox running through fresh snow at sunrise"


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="dense vs RainFusion on one prompt: side-by-side mp4, latency, PSNR/SSIM, density",
        description="Run a pipeline dense and with RainFusion (same seed), write a side-by-side video and report "
        "latency, speedup, fidelity and executed density. The default model is ref-cogvideox, a small CogVideoX "
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
    add_call_args(p)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    add_rainfusion_args(p)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per arm; the report gives the median and the spread (default 3; 1 for the "
                   "built-in small models, whose timings are not reported as a speedup)")
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up runs before timing")
    p.add_argument("--out", default="outputs/compare.mp4",
                   help="side-by-side video (default: %(default)s); replaced only when the run succeeds")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--fps", type=int, default=8)
    p.set_defaults(func=_cmd_compare)


def add_call_args(p: argparse.ArgumentParser) -> None:
    """Pipeline call settings shared by ``compare`` and ``python -m diffusers_attn.generate``."""
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 50 for hub "
                   "models)")
    p.add_argument("--frames", type=int, default=None, help="number of frames (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def add_rainfusion_args(p: argparse.ArgumentParser) -> None:
    """The RainFusion knobs shared by ``compare`` and ``python -m diffusers_attn.generate``."""
    g = p.add_argument_group("RainFusion")
    g.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                   help="share of video x video pairs skipped, in [0, 1) (default: %(default)s; 0 = stock attention)")
    g.add_argument("--mode", default=DEFAULT_MODE, choices=RAINFUSION_MODES,
                   help="rf1: per-head Spatial/Temporal/Textural patterns (ARM); rf2: RainFusion 2.0 block top-k "
                   "(default: %(default)s)")
    g.add_argument("--dense-steps", type=_dense_steps_value, default=0.25,
                   help="dense warm-up: a fraction of the run (0.25) or a number of steps (3)")
    g.add_argument("--dense-layers", type=int, default=1)
    g.add_argument("--arm-threshold", type=float, default=0.9, help="rf1 only (default: %(default)s)")
    g.add_argument("--min-video-tokens", type=int, default=None,
                   help="dense below this many video tokens (library default 4096; 0 for the tiny models)")
    g.add_argument("--block-m", type=int, default=None, help="query block (default 128; 16 for the tiny models)")
    g.add_argument("--block-n", type=int, default=None, help="key block (default 64; 16 for the tiny models)")
    g.add_argument("--force-pattern", default=None, choices=["spatial", "temporal", "textural", "dense"])


def check_call_args(args: argparse.Namespace) -> None:
    """The checks of :func:`add_call_args` and :func:`add_rainfusion_args` values that need no import."""
    check_int("steps", args.steps, 1)
    check_video_size(args.frames, args.height, args.width)
    check_float("guidance-scale", args.guidance_scale, 0.0, 1e4)
    check_int("seed", args.seed, 0, 2**63 - 1)
    check_float("sparsity", args.sparsity, 0.0, 1.0, hi_open=True)
    check_int("dense-layers", args.dense_layers, 0)
    check_float("arm-threshold", args.arm_threshold, 0.0, 1.0)
    check_int("min-video-tokens", args.min_video_tokens, 0)
    check_int("block-m", args.block_m, 1)
    check_int("block-n", args.block_n, 1)
    check_int("fps", getattr(args, "fps", None), 1, 120)
    check_dtype(args.dtype)


def rainfusion_config_from_args(args: argparse.Namespace, tiny: bool):
    """``RainFusionConfig`` from :func:`add_rainfusion_args` options (validated before anything loads)."""
    from .methods.rainfusion import RainFusionConfig

    kw = dict(SMALL_GRID) if tiny else {}  # else the library defaults
    for field, value in (("min_video_tokens", args.min_video_tokens), ("block_m", args.block_m or None),
                         ("block_n", args.block_n or None)):
        if value is not None:
            kw[field] = value
    return RainFusionConfig(
        sparsity=args.sparsity,
        mode=args.mode,
        dense_steps=args.dense_steps,
        dense_layers=args.dense_layers,
        arm_threshold=args.arm_threshold,
        force_pattern=args.force_pattern,
        **kw,
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


def progress(msg: str) -> None:
    """A progress line on stderr (stdout keeps the report)."""
    print(f"diffusers-attn: {msg}", file=sys.stderr, flush=True)


def _step_ticker():
    """``progress(phase, done, total)`` for a terminal: one line per run, rewritten at each step."""

    def tick(phase: str, done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r  {phase}: step {done}/{total}", end=end, file=sys.stderr, flush=True)

    return tick


def _check_compare_args(args: argparse.Namespace) -> None:
    """Everything about ``compare``'s arguments that can be known before a model loads."""
    check_call_args(args)
    check_int("repeats", args.repeats, 1, 100)
    if args.model in VAR_BUILTIN_MODELS:
        raise UsageError(
            f"--model {args.model} is a class-conditional VAR model; `compare` runs RainFusion on text-to-video "
            f"models. Compare LiteVAR against dense in the demo (`diffusers-attn demo`, method LiteVAR, model "
            f"{args.model}) or from Python: diffusers_attn.demo.DemoRunner().run(DemoRequest(model='{args.model}', "
            "method='litevar', prompt='0, 9'))"
        )
    check_model(args.model, VIDEO_BUILTIN_MODELS)
    check_out_path("out", args.out, VIDEO_SUFFIXES)
    check_out_path("json", args.json, (".json",))
    check_device(args.device)  # imports torch: after the cheap checks
    if args.model not in VIDEO_BUILTIN_MODELS:
        from .hub import check_hub_model

        check_hub_model(args.model, VIDEO_BUILTIN_MODELS)  # offline / unreachable Hub: one line, no retries


def _cmd_compare(args: argparse.Namespace) -> int:
    _check_compare_args(args)
    small = args.model in VIDEO_BUILTIN_MODELS  # small latent grids: small RainFusion defaults, 1 timed run
    config = rainfusion_config_from_args(args, small)  # the config's own checks, before anything heavy loads
    progress(f"loading {args.model}")
    from .api import apply_rainfusion
    from .compare import load_pipeline, resolve_device_dtype, run_comparison, side_by_side_frames, write_video

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    loaded = load_pipeline(args.model, device, dtype, seed=args.seed)
    call = dict(loaded.defaults)
    for key, val in (("num_inference_steps", args.steps), ("num_frames", args.frames), ("height", args.height),
                     ("width", args.width), ("guidance_scale", args.guidance_scale)):
        if val is not None:
            call[key] = val
    call.setdefault("num_inference_steps", 50)
    prompt = args.prompt or loaded.default_prompt or DEFAULT_PROMPT
    result = run_comparison(
        loaded, lambda pipe: apply_rainfusion(pipe, config), method_name="rainfusion",
        prompt=prompt, negative_prompt=args.negative_prompt, call_kwargs=call, seed=args.seed,
        device=device, warmup=not args.no_warmup, note=_compare_note(args.model), on_phase=progress,
        progress=_step_ticker() if sys.stderr.isatty() else None, repeats=args.repeats or (1 if small else 3),
    )
    result.settings.update(rainfusion_mode=config.mode, sparsity=config.sparsity)
    print(f"RainFusion {config.mode}, sparsity {config.sparsity:g}")
    print(result.report())
    print(result.stats)
    timing = "" if result.speedup_withheld else f" ({result.speedup:.2f}x)"
    frames = side_by_side_frames(
        result.dense.frames, result.accelerated.frames,
        ("dense", f"RainFusion {config.mode} s={config.sparsity:g}{timing}"),
    )
    print(f"wrote {write_video(args.out, frames, fps=args.fps)}")
    if args.json:
        print(f"wrote {write_text_replacing(args.json, json.dumps(result.to_dict(), indent=2, default=str))}")
    return 0


def _compare_note(model: str) -> str | None:
    if model.startswith("ref-"):
        return ("trained reference model (procedural moving shapes, 9 latent frames x 8 x 8 tokens): "
                "min_video_tokens=0 and 16-token blocks so the sparse path runs at this size")
    if model.startswith("tiny-"):
        return ("tiny random-weight model: it has no learned attention structure, so its ARM decisions and "
                "fidelity figures check the plumbing, not quality; min_video_tokens=0 and 16-token blocks so the "
                "sparse path runs at all")
    return None


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
    for flag, path in (("original", args.original), ("vae", args.vae)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: file not found")
    if Path(args.outdir).is_file():
        raise UsageError(f"outdir {args.outdir}: is a file, not a folder")
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
    check_int("port", args.port, 1, 65535)
    check_dtype(args.dtype)
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise RuntimeError('the demo needs Gradio: pip install "diffusers-attn[demo]"')
    check_device(args.device)
    from .demo import DemoRunner, launch_demo

    demo = launch_demo(host=args.host, port=args.port, share=args.share, runner=DemoRunner(args.device, args.dtype),
                       quiet=True, prevent_thread_lock=True)
    print(f"diffusers-attn demo: running on {demo.local_url}")
    if args.share:
        print(f"public link: {demo.share_url}" if demo.share_url else "could not open a public link (see above)")
    else:
        print("for a public link, run again with --share")
    demo.block_thread()
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
    p.add_argument("--token-order", default="tiles", choices=["raster", "tiles"],
                   help="video token order the plan runs in (default tiles, the library default: spatio-temporal "
                   "tiles, see RainFusionConfig; raster: the model's (t, h, w) order)")
    p.add_argument("--block-m", type=int, default=128, help="query block (default 128)")
    p.add_argument("--block-n", type=int, default=64, help="key block (default 64)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the schedule (default 50)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    p.set_defaults(func=_cmd_plan)


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
    parser.add_argument("-v", "--verbose", action="store_true", help="INFO logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compare(sub)
    _add_convert_opensora(sub)
    _add_demo(sub)
    _add_eval(sub)
    _add_plan(sub)
    _one_line_errors_everywhere(parser)
    return parser


def _one_line_errors_everywhere(parser: argparse.ArgumentParser) -> None:
    """:func:`_one_line_errors` on ``parser`` and every sub-command parser below it."""
    _one_line_errors(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _one_line_errors_everywhere(sub)


def setup_logging(verbose: bool) -> None:
    """One handler, on the package's logger: ``basicConfig`` would add a root handler beside the ones diffusers
    and huggingface_hub install, and every library warning would print twice."""
    log = logging.getLogger("diffusers_attn")
    if not any(getattr(h, "_diffusers_attn_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._diffusers_attn_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as e:
        # Bad input gets one readable line; -v shows the traceback.
        if args.verbose:
            raise
        print(f"diffusers-attn: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusers-attn: interrupted (no output was replaced)", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span screens)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else e.__class__.__name__


if __name__ == "__main__":
    sys.exit(main())
