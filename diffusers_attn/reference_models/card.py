"""Write a reference model's card (``<weights>/README.md`` + ``quality.json``) from its training log and a fresh
fidelity measurement: ``python -m diffusers_attn.reference_models.card --model ref-cogvideox``.

Every number in the card is read from ``train_log.json`` or measured by this script (CPU, fp32, seed 0); the prose
is ``card_template.md`` and the model's ``card_notes/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import string
from datetime import date
from pathlib import Path

import torch

from . import ARCH, REFERENCE_MODELS, load_reference_pipeline, weights_path
from .quality import QUALITY_PROMPTS, SMALL_GRID, fidelity_sweep, summarize

SPARSITIES = (0.6, 0.75, 0.9)
MODES = ("arm", "arm_t0", "arm_t08", "spatial", "temporal", "textural")
# arm_t0: every head sparse with its best pattern (the cheapest rule at threshold 0 would take the cheapest one)
ARM_KW = {"arm": {}, "arm_t0": {"arm_threshold": 0.0, "arm_rule": "argmax"}, "arm_t08": {"arm_threshold": 0.8}}

TEMPLATE = Path(__file__).with_name("card_template.md")
#: Per-model prose (``<name>.md``): the objective, the unconditional input, notes on the samples, findings.
NOTES_DIR = Path(__file__).with_name("card_notes")
_SECTION = re.compile(r"^<!-- (\w+)(?::[^\n]*)? -->\n", re.MULTILINE)


def measure(name: str) -> dict:
    torch.set_num_threads(1)
    spec = load_reference_pipeline(name)
    out = {"date": date.today().isoformat(), "torch": torch.__version__, "cpu": platform.machine(),
           "prompts": list(QUALITY_PROMPTS), "call": spec.defaults, "small_grid": SMALL_GRID, "runs": {}}
    for mode in MODES:
        kw = ARM_KW.get(mode, {"force_pattern": mode})
        out["runs"][mode] = summarize(fidelity_sweep(spec, SPARSITIES, QUALITY_PROMPTS, **kw))
    return out


def table(summary: list[dict]) -> list[str]:
    lines = ["| sparsity | PSNR mean (worst) dB | SSIM mean (worst) | video density | head-calls per pattern |",
             "|---:|---:|---:|---:|---|"]
    for r in summary:
        pats = ", ".join(f"{k} {v}" for k, v in sorted(r["patterns"].items()))
        lines.append(f"| {r['sparsity']:.2f} | {r['psnr_mean_db']:.2f} ({r['psnr_min_db']:.2f}) | "
                     f"{r['ssim_mean']:.4f} ({r['ssim_min']:.4f}) | {r['video_density']:.3f} | {pats} |")
    return lines


def card_prose(name: str) -> dict[str, str]:
    """The sections of ``card_notes/<name>.md`` (each starts with a ``<!-- section: ... -->`` line)."""
    parts = _SECTION.split((NOTES_DIR / f"{name}.md").read_text())
    return {key: body.strip() for key, body in zip(parts[1::2], parts[2::2])}


def render_card(name: str, quality: dict, log: dict) -> str:
    """The card's Markdown from :data:`TEMPLATE`, the model's prose, its training log and ``quality``."""
    arch = ARCH[name]
    prose = card_prose(name)
    losses = [r["loss"] for r in log["log"]]
    first, last = losses[:5], losses[-10:]
    cogvideox = arch["family"] == "cogvideox"
    runs = quality["runs"]
    fields = dict(
        name=name,
        transformer_class="CogVideoXTransformer3DModel" if cogvideox else "HunyuanVideoTransformer3DModel",
        pipeline_class="CogVideoXPipeline" if cogvideox else "HunyuanVideoPipeline",
        transformer_kwargs=", ".join(f"{k}={v!r}" for k, v in arch["transformer"].items()),
        params=f"{log['params']:,}",
        scaling_factor=arch["vae"]["scaling_factor"], shift_factor=arch["vae"]["shift_factor"],
        text_len=arch["text_len"], text_dim=arch["text_dim"],
        sampling_defaults=arch["defaults"],
        steps=log["steps"], time_limit_option=" --time-limit ..." if log["steps_done"] < log["steps"] else "",
        caption_dropout=log["caption_dropout"], batch=log["batch"], frames=log["frames"], size=log["size"],
        seed=log["seed"], lr=log["lr"], warmup=log["warmup"], ema_decay=log["ema_decay"],
        steps_done=log["steps_done"], clips=f"{log['steps_done'] * log['batch']:,}",
        minutes=f"{log['wall_s'] / 60:.1f}", threads=log["threads"],
        first_losses=", ".join(f"{x:.3f}" for x in first), last_losses=f"{min(last):.3f}-{max(last):.3f}",
        last_step=log["log"][-1]["step"],
        date=quality["date"], cpu=quality["cpu"], torch=quality["torch"], n_prompts=len(quality["prompts"]),
        prompts="; ".join(quality["prompts"]),
        **{f"{mode}_table": "\n".join(table(runs[mode])) for mode in MODES},
        objective=prose["objective"], unconditional=prose["unconditional"],
        notes=f"{prose['notes']}\n\n" if prose.get("notes") else "", findings=prose.get("findings", ""),
    )
    return string.Template(TEMPLATE.read_text()).substitute(fields)


def write_card(name: str, quality: dict) -> Path:
    """Write ``<weights>/README.md`` (from the folder's ``train_log.json``) and ``quality.json``."""
    folder = weights_path(name)
    log = json.loads((folder / "train_log.json").read_text())
    (folder / "README.md").write_text(render_card(name, quality, log))
    (folder / "quality.json").write_text(json.dumps(quality, indent=1))
    return folder / "README.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ref-cogvideox", choices=REFERENCE_MODELS)
    p.add_argument("--reuse", action="store_true", help="rewrite the card from the existing quality.json")
    args = p.parse_args(argv)
    if args.reuse:
        q = json.loads((weights_path(args.model) / "quality.json").read_text())
    else:
        q = measure(args.model)
    for mode, summ in q["runs"].items():
        print(mode, "\n".join(table(summ)), sep="\n")
    print(f"wrote {write_card(args.model, q)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
