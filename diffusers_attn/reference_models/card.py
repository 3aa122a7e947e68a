"""Write a reference model's card (``<weights>/README.md`` + ``quality.json``) from its training log and a fresh
fidelity measurement: ``python -m diffusers_attn.reference_models.card --model ref-cogvideox``.

Every number in the card is read from ``train_log.json`` or measured by this script (CPU, fp32, seed 0).
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from . import ARCH, REFERENCE_MODELS, load_reference_pipeline, weights_path
from .quality import QUALITY_PROMPTS, SMALL_GRID, fidelity_sweep, summarize

SPARSITIES = (0.6, 0.75, 0.9)
MODES = ("arm", "arm_t0", "arm_t08", "spatial", "temporal", "textural")
ARM_KW = {"arm": {}, "arm_t0": {"arm_threshold": 0.0}, "arm_t08": {"arm_threshold": 0.8}}

OBJECTIVE = {
    "cogvideox": "v-prediction MSE under the stock `CogVideoXDDIMScheduler` (scaled-linear betas 0.00085-0.012, "
                 "zero terminal SNR, trailing spacing), uniform timesteps",
    "hunyuan_video": "flow matching (target noise - x0) under the stock `FlowMatchEulerDiscreteScheduler` "
                     "(shift 3; training sigmas drawn with the same shift)",
}


#: What the samples show, per model (looked at by the person who trained it; update when retraining).
NOTES = {
    "ref-cogvideox": (
        "Undertrained (the loss was still falling when the CPU time budget ended): the caption's colour is "
        "followed reliably and the background texture roughly, but shapes are blobs with 4x4-pixel patch "
        "artefacts and motion is weak (the blob jitters more than it travels). Good enough for its purpose, a "
        "model with learned, input-dependent attention whose dense output sparse attention must reproduce; "
        "train longer (e.g. on a GPU) for crisper samples."
    ),
    "ref-hunyuan": (
        "Undertrained like ref-cogvideox (1600 steps, loss still falling): single colours and backgrounds follow "
        "the caption, shapes are blobs, motion is weak, and `changing` (the hue sweep) is not learned (a "
        "multicoloured mess). Sampled with true classifier-free guidance against the empty prompt."
    ),
}

#: What the measured tables show, per model (written from the tables below; update when re-measuring).
FINDINGS = {"ref-cogvideox": (
    "What this grid shows: (1) ARM at the default threshold 0.9 keeps most heads dense (the small model's "
    "attention is diffuse over only 576 tokens), so the default configuration is very close to dense; "
    "(2) with every head sparse (`arm_threshold=0`), ARM picks `temporal` almost always and fidelity stays above "
    "30 dB at sparsity 0.6; (2b) at `arm_threshold=0.8` about two thirds of the eligible head-calls go sparse "
    "and the worst prompt stays near 38 dB; (3) nominal sparsities 0.6 and 0.75 can give the same windows after rounding on a "
    "9 x 8 x 8 grid with 16-token blocks (then the outputs are identical), and quality falls wherever the realized "
    "density falls. Realistic sparsity-vs-quality curves need larger grids (more latent frames and rows) than a "
    "CPU-trained fixture affords."
), "ref-hunyuan": (
    "What this grid shows: (1) ARM at the default threshold 0.9 keeps almost every head dense (about 2% of the "
    "eligible head-calls go sparse, video density 0.997), so the default configuration meets the issue-10 target "
    "(>= 30 dB, SSIM >= 0.9 at sparsity 0.6) only because it is nearly dense; (2) with every head sparse "
    "(`arm_threshold=0`) the target is **not met**: 28.6 dB mean, 24.8 dB worst at sparsity 0.6 (density 0.83), "
    "clearly worse than ref-cogvideox (37.5 dB at density 0.89): the flow-matching Euler sampler with 16 steps "
    "carries attention errors further, and dense_layers=1 protects only 1 of 4 blocks; (3) as for ref-cogvideox, "
    "temporal is ARM's pick and beats spatial/textural, and 0.6 / 0.75 round to the same temporal windows. "
    "(4) At `arm_threshold=0.8` about a quarter of the eligible head-calls go sparse and the target is met "
    "(30.7 dB worst of 6 prompts, SSIM >= 0.969, video density 0.96): the CI fixture for real sparsity on this "
    "model. A longer retrain (4000 steps, 32 min; BENCHMARKS.md) gave cleaner samples but was *less* robust "
    "to sparsity (27.5 dB mean, 20.4 dB worst with every head sparse), so it was not shipped. Every head sparse at "
    "30 dB would need a larger grid or more dense layers/steps."
)}


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


def write_card(name: str, quality: dict) -> Path:
    folder = weights_path(name)
    log = json.loads((folder / "train_log.json").read_text())
    arch = ARCH[name]
    steps = [r["step"] for r in log["log"]]
    losses = [r["loss"] for r in log["log"]]
    first, last = losses[:5], losses[-10:]
    cls = "CogVideoXTransformer3DModel" if arch["family"] == "cogvideox" else "HunyuanVideoTransformer3DModel"
    pipe = "CogVideoXPipeline" if arch["family"] == "cogvideox" else "HunyuanVideoPipeline"
    t = arch["transformer"]
    lines = [
        f"# {name}: a small trained `{cls}`",
        "",
        f"A text-conditioned video diffusion model run by the stock diffusers `{pipe}`, shipped with diffusers-attn "
        "as an offline quality fixture and demo default. It generates 9-frame 32x32 clips of the procedural "
        "grammar in `diffusers_attn/reference_models/data.py`: `<colour> <shape> <motion> over <background>` "
        "(colours red/yellow/green/blue/changing, shapes circle/square/triangle, motions moves left/right/up/down "
        "or spins, backgrounds stripes/checker/dots; 225 captions). It knows nothing else.",
        "",
        "## Architecture",
        "",
        f"* transformer: `{cls}({', '.join(f'{k}={v!r}' for k, v in t.items())})`, "
        f"{log['params']:,} parameters, fp32 safetensors in `transformer/`.",
        "* autoencoder: `PixelShuffleAutoencoder` (this package): fixed, lossless space-to-depth by 2 plus "
        f"`z = {arch['vae']['scaling_factor']} * (x - ({arch['vae']['shift_factor']}))`, no weights, no temporal "
        "compression. Latents are 12 x 9 x 16 x 16, so the transformer grid is **9 latent frames x 8 x 8 = 576 "
        "video tokens** (patch 2).",
        "* text: no text encoder. Each caption word maps to a fixed seeded vector "
        f"(`pipelines.tiny.prompt_embeddings`, {arch['text_len']} tokens x {arch['text_dim']}); the empty prompt "
        "(all-zero token vectors"
        + ("; its pooled vector is the fixed one of the empty string" if arch["family"] == "hunyuan_video" else "")
        + ") is the unconditional input.",
        f"* sampling defaults: `{arch['defaults']}`.",
        "",
        "## Training",
        "",
        f"`python -m diffusers_attn.reference_models.train --model {name} --steps {log['steps']}"
        + (" --time-limit ..." if log["steps_done"] < log["steps"] else "") + "`",
        "",
        f"* objective: {OBJECTIVE[arch['family']]}; caption dropout {log['caption_dropout']} to the empty prompt "
        "(for classifier-free guidance).",
        f"* data: fresh procedural clips every step (batch {log['batch']}, {log['frames']} frames, "
        f"{log['size']}x{log['size']} px), seeded: step k uses `data.sample_batch(seed * 1000003 + k, batch)`; "
        f"seed {log['seed']}.",
        f"* optimiser: AdamW lr {log['lr']} (warm-up {log['warmup']} steps, cosine to 0.1x over {log['steps']} "
        f"planned steps), weight decay 0.01, grad-clip 1.0; EMA {log['ema_decay']} (the EMA weights are shipped).",
        f"* ran **{log['steps_done']} steps** ({log['steps_done'] * log['batch']:,} clips) in "
        f"{log['wall_s'] / 60:.1f} min on a shared CPU, {log['threads']} torch thread.",
        f"* loss (mean of 10 steps): first {', '.join(f'{x:.3f}' for x in first)}; last ten "
        f"{min(last):.3f}-{max(last):.3f} (step {steps[-1]}).",
        "",
        "![loss](loss.png)",
        "",
        "Samples (seed 0, sampling defaults; rows = prompts, frames left to right):",
        "",
        "![samples](samples.png)",
        "",
        "## RainFusion fidelity vs dense (same seed)",
        "",
        f"Measured by `python -m diffusers_attn.reference_models.card --model {name}` on {quality['date']} "
        f"(CPU {quality['cpu']}, torch {quality['torch']}, fp32), over {len(quality['prompts'])} prompts "
        f"({'; '.join(quality['prompts'])}), seed 0. RainFusion library defaults (dense_steps=0.25, dense_layers=1, "
        "arm_threshold=0.9) except `min_video_tokens=0, block_m=16, block_n=16`: the 576-token grid is below the "
        "default `min_video_tokens=4096` (everything would stay dense) and 16-token blocks (a quarter of a latent "
        "frame) let the patterns' windows be resolved. PSNR is global-MSE over all frames (values above 99 dB "
        "clamp to 99), SSIM Gaussian 11x11, both on [0, 1] RGB; raw numbers in `quality.json`.",
        "",
        "### ARM (pattern chosen per head and call)",
        "",
        *table(quality["runs"]["arm"]),
        "",
    ]
    lines += ["### ARM with `arm_threshold=0` (every head takes its best sparse pattern)", "",
              *table(quality["runs"]["arm_t0"]), "",
              "### ARM with `arm_threshold=0.8` (a head goes sparse when its best pattern keeps >= 80% of the "
              "sampled mass)", "", *table(quality["runs"]["arm_t08"]), ""]
    for mode in MODES[3:]:
        lines += [f"### every sparse head forced to `{mode}`", "", *table(quality["runs"][mode]), ""]
    lines += [
        "Head-calls count (batch x heads) per attention call; `fallback` = a whole call ran dense (layer 0, "
        "the warm-up steps).",
        "",
        FINDINGS.get(name, ""),
        "",
    ]
    if name in NOTES:
        lines[lines.index("![samples](samples.png)") + 1:lines.index("![samples](samples.png)") + 1] = [
            "", NOTES[name]]
    (folder / "README.md").write_text("\n".join(lines))
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
