"""``diffusers-attn eval ...``: prompt suites, resumable paired sampling, fidelity, VBench.

    diffusers-attn eval prompts --suite quick
    diffusers-attn eval sample --model THUDM/CogVideoX-5b --suite quick --out runs/cogx5b-rf
    diffusers-attn eval fidelity runs/cogx5b-rf
    diffusers-attn eval vbench-setup --venv ~/venvs/vbench
    diffusers-attn eval vbench-doctor --cache-dir ~/vbench_weights --venv ~/venvs/vbench
    diffusers-attn eval vbench runs/cogx5b-rf --venv ~/venvs/vbench --cache-dir ~/vbench_weights --mode custom \\
        --dimensions subject_consistency imaging_quality
    diffusers-attn eval vbench-aggregate runs/cogx5b-rf/vbench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._defaults import DEFAULT_MODE, DEFAULT_SPARSITY, RAINFUSION_MODES, VIDEO_BUILTIN_MODELS
from ..cli_checks import UsageError, check_device, check_dtype, check_float, check_int, check_model, check_video_size
from .prompts import load_suite
from .vbench import aggregate, default_cache_dir, doctor, format_aggregate, format_doctor, run_vbench, setup_venv

EVAL_DESCRIPTION = """\
Evaluate a method on a prompt suite: sample it dense and accelerated (same seeds), then measure paired fidelity
and, optionally, VBench. For example:

    diffusers-attn eval prompts --suite quick
    diffusers-attn eval sample --model THUDM/CogVideoX-5b --suite quick --out runs/cogx5b-rf
    diffusers-attn eval fidelity runs/cogx5b-rf
    diffusers-attn eval vbench-setup --venv ~/venvs/vbench
    diffusers-attn eval vbench-doctor --cache-dir ~/vbench_weights --venv ~/venvs/vbench
    diffusers-attn eval vbench runs/cogx5b-rf --venv ~/venvs/vbench --cache-dir ~/vbench_weights --mode custom \\
        --dimensions subject_consistency imaging_quality
    diffusers-attn eval vbench-aggregate runs/cogx5b-rf/vbench
"""

# As in diffusers_attn.cli: the sampling and fidelity engines (torch, diffusers) are imported by their command
# handlers, so building the parser (``diffusers-attn --help``) does not load them. prompts and vbench are light.


def _knob(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, {"true": True, "false": False}.get(v.lower(), v)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluation: sample a prompt suite, paired fidelity, VBench",
                       description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    es = p.add_subparsers(dest="eval_command", required=True)

    q = es.add_parser("prompts", help="list a prompt suite")
    q.add_argument("--suite", default="quick", help="quick | all | reference | dimension:NAME | file:PATH")
    q.set_defaults(func=_cmd_prompts)

    s = es.add_parser(
        "sample", help="resumable dense + accelerated sampling of a prompt suite",
        description="Generate every prompt of a suite twice with the same seed, dense and with the method, into "
        "OUT/dense and OUT/<method> (lossless frames, mp4s, per-video records of timing and density). Rerunning "
        "with the same settings resumes; other settings on an existing folder are refused. Then run "
        "`diffusers-attn eval fidelity OUT`.",
    )
    s.add_argument("--model", default="ref-cogvideox",
                   help="ref-cogvideox (trained offline reference, default) | ref-hunyuan | tiny-cogvideox | "
                   "tiny-cogvideox-1.5 | tiny-hunyuan | tiny-opensora | a diffusers hub id or local folder")
    s.add_argument("--suite", default=None,
                   help="quick (44 VBench prompts) | all | reference (8 captions the ref-* models know) | "
                   "dimension:NAME | file:PATH (default: reference for ref-* models, else quick)")
    s.add_argument("--method", default="rainfusion", help="a method key of the registry (diffusers_attn.demo)")
    s.add_argument("--knob", type=_knob, action="append", default=[], metavar="NAME=VALUE",
                   help="method setting, repeatable (rainfusion: sparsity, mode, dense_steps, dense_layers, "
                   f"arm_threshold, arm_rule; default sparsity {DEFAULT_SPARSITY})")
    s.add_argument("--mode", default=None, choices=RAINFUSION_MODES,
                   help=f"RainFusion mode, same as --knob mode=... (default {DEFAULT_MODE})")
    s.add_argument("--out", required=True, help="output root (resumed if it exists)")
    s.add_argument("--videos-per-prompt", type=int, default=1, help="VBench uses 5 (25 for temporal_flickering)")
    s.add_argument("--seed", type=int, default=0, help="base seed: video i of each prompt uses seed + i")
    s.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--frames", type=int, default=None)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--fps", type=int, default=8)
    s.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up run per arm")
    s.set_defaults(func=_cmd_sample)

    f = es.add_parser("fidelity", help="paired PSNR/SSIM/LPIPS per video (CSV) and summary (mean ± std)")
    f.add_argument("root", help="a folder written by `eval sample`")
    f.add_argument("--no-lpips", action="store_true")
    f.add_argument("--lpips-backbone", default=None, help="torchvision alexnet-owt-7be5be79.pth")
    f.add_argument("--lpips-heads", default=None, help="LPIPS v0.1 alex.pth (default: the copy torchmetrics ships)")
    f.set_defaults(func=_cmd_fidelity)

    v = es.add_parser("vbench", help="run VBench (in its own venv) on each arm of a sample folder")
    v.add_argument("root", help="a folder written by `eval sample`")
    v.add_argument("--dimensions", nargs="+", required=True)
    v.add_argument("--mode", choices=["standard", "custom"], default="standard")
    v.add_argument("--venv", default=None, help="the VBench virtual environment (see vbench-setup)")
    v.add_argument("--vbench", default=None, help="path of the vbench executable (instead of --venv)")
    v.add_argument("--cache-dir", default=None, help="local VBench weight folder (VBENCH_CACHE_DIR)")
    v.add_argument("--allow-downloads", action="store_true",
                   help="let VBench download missing weights (default: local mode, --load_ckpt_from_local)")
    v.add_argument("--out", default=None, help="results folder (default ROOT/vbench)")
    v.set_defaults(func=_cmd_vbench)

    d = es.add_parser("vbench-doctor", help="which VBench dimensions can run with the weights present")
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--venv", default=None, help="also check detectron2 in this venv")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_doctor)

    a = es.add_parser("vbench-aggregate", help="per-dimension deltas vs dense, renormalised over dimensions present")
    a.add_argument("results", help="the results folder of `eval vbench` (ROOT/vbench)")
    a.add_argument("--baseline", default="dense")
    a.add_argument("--json", default=None, help="also write the report here")
    a.set_defaults(func=_cmd_aggregate)

    u = es.add_parser("vbench-setup", help="create the separate VBench venv (pip install vbench==0.1.5)")
    u.add_argument("--venv", required=True)
    u.add_argument("--dry-run", action="store_true", help="only print the commands")
    u.set_defaults(func=_cmd_setup)


def _cmd_prompts(args: argparse.Namespace) -> int:
    prompts = load_suite(args.suite)
    for p in prompts:
        print(p.text + (f"\t[{', '.join(p.dimensions)}]" if p.dimensions else ""))
    print(f"# {len(prompts)} prompts in suite {args.suite!r}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    for name in ("videos_per_prompt", "limit", "steps"):
        check_int(name.replace("_", "-"), getattr(args, name), 1)
    check_video_size(args.frames, args.height, args.width)
    check_float("guidance-scale", args.guidance_scale, 0.0, 1e4)
    check_int("seed", args.seed, 0, 2**63 - 1)
    check_int("fps", args.fps, 1, 120)
    check_dtype(args.dtype)
    check_model(args.model, VIDEO_BUILTIN_MODELS)
    knobs = dict(args.knob)
    if args.mode is not None:
        if knobs.get("mode", args.mode) != args.mode:
            raise UsageError(f"--mode {args.mode} and --knob mode={knobs['mode']} disagree")
        knobs["mode"] = args.mode
    check_device(args.device)
    from .sample import SampleConfig, sample

    call = {"num_inference_steps": args.steps, "num_frames": args.frames, "height": args.height,
            "width": args.width, "guidance_scale": args.guidance_scale}
    suite = args.suite or ("reference" if args.model.startswith("ref-") else "quick")
    cfg = SampleConfig(model=args.model, out=Path(args.out), suite=suite, method=args.method,
                       knobs=knobs, videos_per_prompt=args.videos_per_prompt, seed=args.seed,
                       call=call, limit=args.limit, warmup=not args.no_warmup, device=args.device,
                       dtype=args.dtype, fps=args.fps)
    res = sample(cfg)
    print(f"{res.root}: generated {res.generated} videos, {res.skipped} prompt/index pairs already finished")
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from .fidelity import fidelity

    fidelity(args.root, use_lpips=not args.no_lpips, lpips_backbone=args.lpips_backbone,
             lpips_heads=args.lpips_heads)
    print(f"wrote {Path(args.root) / 'fidelity.csv'} and {Path(args.root) / 'fidelity_summary.json'}")
    return 0


def _cmd_vbench(args: argparse.Namespace) -> int:
    out = run_vbench(args.root, args.dimensions, mode=args.mode, out=args.out, venv=args.venv, exe=args.vbench,
                     cache_dir=args.cache_dir, local=not args.allow_downloads)
    print(format_aggregate(aggregate(out)))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    python = str(Path(args.venv) / "bin" / "python") if args.venv else None
    statuses = doctor(cache, python)
    if args.json:
        print(json.dumps([s.__dict__ for s in statuses], indent=2))
    else:
        print(format_doctor(statuses, cache))
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    report = aggregate(args.results, baseline=args.baseline)
    print(format_aggregate(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_setup(args: argparse.Namespace) -> int:
    setup_venv(args.venv, dry_run=args.dry_run)
    return 0
