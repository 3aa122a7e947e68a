"""Model card of ``ref-var``: loss curve, sample grid (dense vs LiteVAR), held-out loss and LiteVAR quality (the
prose is ``card_template.md``).

    python -m diffusers_attn.reference_models.var.card   # after .train; writes weights/ref-var/{README.md,...}
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import string
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...pipelines.var import VARTransformer
from . import DEFAULT_CALL, load_reference_var_pipeline, reference_var_path
from .data import CLASS_NAMES, NUM_CLASSES, PLACEMENTS, make_dataset
from .quality import calibrate, guidance_sweep, measure, part_config, sample
from .train import VAR_CONFIG, teacher_forced_loss, tokenize

TEMPLATE = Path(__file__).with_name("card_template.md")


@torch.no_grad()
def class_image_loss(pipe, untrained_seed: int = 0) -> dict[str, float]:
    """Teacher-forced next-scale cross-entropy (nats/token) on the class images, one per class (the data has no
    held-out set: every class is one image), trained vs freshly initialised."""
    x, y = make_dataset(NUM_CLASSES)
    ids, teacher = tokenize(pipe.vqvae, x)
    torch.manual_seed(untrained_seed)
    fresh = VARTransformer(**VAR_CONFIG).eval()
    return {"trained": round(teacher_forced_loss(pipe.transformer, y, ids, teacher).item(), 6),
            "untrained": round(teacher_forced_loss(fresh, y, ids, teacher).item(), 4),
            "uniform": round(math.log(pipe.transformer.vocab_size), 4)}


def loss_png(history: dict, path: Path) -> None:
    """Two panels (VQVAE reconstruction loss, VAR cross-entropy) vs step, drawn with PIL."""
    W, H, pad = 320, 160, 28
    img = Image.new("RGB", (2 * W, H), "white")
    d = ImageDraw.Draw(img)
    for i, (key, field, title) in enumerate((("vq", "rec", "VQVAE L1+MSE"), ("var", "ce", "VAR cross-entropy"))):
        pts = history.get(key) or []
        if not pts:
            continue
        xs = np.array([p["step"] for p in pts], float)
        ys = np.array([p[field] for p in pts], float)
        k = max(1, len(ys) // 40)  # running mean so the trend is readable
        ys = np.convolve(ys, np.ones(k) / k, mode="valid")
        xs = xs[k - 1 :]
        lo, hi = float(ys.min()), float(ys.max())
        x0 = i * W
        d.rectangle([x0 + pad, 8, x0 + W - 8, H - pad], outline=(0, 0, 0))
        sx = lambda v: x0 + pad + (v - xs[0]) / max(1e-9, xs[-1] - xs[0]) * (W - pad - 8)  # noqa: E731
        sy = lambda v: 8 + (hi - v) / max(1e-9, hi - lo) * (H - pad - 8)  # noqa: E731
        d.line([(sx(a), sy(b)) for a, b in zip(xs, ys)], fill=(26, 115, 232), width=2)
        d.text((x0 + pad + 4, 10), f"{title}  {hi:.3f} -> {ys[-1]:.3f}", fill=(0, 0, 0))
        d.text((x0 + pad, H - pad + 4), f"step 0 .. {int(xs[-1])}", fill=(0, 0, 0))
    img.save(path)


def sample_grid(pipe, masks, path: Path, seed: int = 0, scale: int = 3) -> None:
    """Rows: training data, dense (sampled, seed), LiteVAR all parts (same seed), dense greedy; one column per
    class."""
    from ...api.litevar import apply_litevar, remove_litevar

    labels = list(range(len(CLASS_NAMES)))
    x, y = make_dataset(len(labels) * 4, 7)
    data = torch.stack([x[(y == c).nonzero()[0, 0]] for c in labels]).add(1).div(2)
    dense, _ = sample(pipe, labels, seed)
    apply_litevar(pipe, part_config("all", masks))
    try:
        lite, _ = sample(pipe, labels, seed)
    finally:
        remove_litevar(pipe)
    greedy, _ = sample(pipe, labels, seed, top_k=1)
    rows = [torch.cat(list(r), dim=2) for r in (data, dense, lite, greedy)]
    grid = torch.cat(rows, dim=1).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(grid)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def _fmt_part(rep: dict) -> list[str]:
    lines = ["| part | comparison | PSNR (dB) | SSIM | token agreement per scale | identical images |",
             "|---|---|---|---|---|---|"]
    for part, modes in rep["parts"].items():
        for mode, m in modes.items():
            if mode == "dense_prefix_logits":
                continue
            agree = ", ".join(f"{v:.3f}" for v in m["token_agreement_per_scale"])
            lines.append(f"| {part} | {mode} | {m['psnr_db']} | {m['ssim']} | {agree} | {m['identical_images']} |")
    lines += ["", "Flip-free comparison: both models fed dense's tokens (sampled, first seed) at every scale; their "
              "guided logits per scale:", "",
              "| part | KL(dense ‖ LiteVAR) per scale (nats/token) | argmax agreement per scale |", "|---|---|---|"]
    for part, modes in rep["parts"].items():
        m = modes["dense_prefix_logits"]
        lines.append(f"| {part} | {', '.join(f'{v:.4f}' for v in m['kl_per_scale'])} | "
                     f"{', '.join(f'{v:.3f}' for v in m['top1_agreement_per_scale'])} |")
    return lines


def _fmt_degraded(rep: dict) -> list[str]:
    lines = ["| degraded variant | " + " | ".join(next(iter(rep["degraded"].values()))) + " |",
             "|---|" + "---|" * len(next(iter(rep["degraded"].values())))]
    for name, modes in rep["degraded"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m['psnr_db']} dB ({m['identical_images']} identical)"
                                                 for m in modes.values()) + " |")
    return lines


def _fmt_guidance(rows: list[dict]) -> list[str]:
    lines = ["| guidance_scale | LiteVAR all vs dense, seed 0 (dB) | SSIM | dense vs dense, seed 100 (dB) |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['guidance_scale']} | {r['all']['psnr_db']} | {r['all']['ssim']} | "
                     f"{r['dense_other_seed']['psnr_db']} |")
    return lines


def render_card(training: dict, quality: dict, held: dict, guidance: list[dict],
                measured_at: str | None = None) -> str:
    """The card's Markdown from :data:`TEMPLATE`, the training record and the measurements (``measured_at``:
    default now, UTC)."""
    vq_last = training["history"]["vq"][-1]
    var_last = training["history"]["var"][-1]
    seed_floor = quality["floor_dense_vs_dense_other_seed"]
    wrong = quality["floor_other_placement"]
    allp = quality["parts"]["all"]
    sampled = [m["psnr_db"] for k, m in allp.items() if k.startswith("sampled")]
    fields = dict(
        num_classes=NUM_CLASSES, last_class=NUM_CLASSES - 1, placements=", ".join(PLACEMENTS),
        class_names=", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES)),
        n_train=training["n_train"], train_seed=training["train_seed"], threads=training.get("threads", 1),
        device=training.get("device", "cpu"), train_torch=training["torch"],
        vq_steps=training["vq_steps"], vq_seconds=training["vq_seconds"], vq_rec=vq_last["rec"],
        vq_loss=vq_last["vq"], vq_recon_psnr_db=training["vq_recon_psnr_db"],
        var_steps=training["var_steps"], var_seconds=training["var_seconds"], var_ce=var_last["ce"],
        ce_trained=held["trained"], ce_untrained=held["untrained"], ce_uniform=held["uniform"],
        default_call=DEFAULT_CALL,
        mask_threshold=quality["mask_threshold"], kept_share_per_scale=quality["kept_share_per_scale"],
        n_labels=len(quality["labels"]), eval_call=quality["call"], seeds=quality["seeds"],
        parts_table="\n".join(_fmt_part(quality)),
        floor_seed=quality["seeds"][0] + 100, floor_psnr_db=seed_floor["psnr_db"], floor_ssim=seed_floor["ssim"],
        wrong_psnr_db=wrong["psnr_db"], wrong_ssim=wrong["ssim"],
        sampled_min=min(sampled), sampled_max=max(sampled), greedy_psnr_db=allp["greedy"]["psnr_db"],
        degraded_table="\n".join(_fmt_degraded(quality)), guidance_table="\n".join(_fmt_guidance(guidance)),
        measured_at=measured_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=platform.machine(), torch_version=torch.__version__,
    )
    return string.Template(TEMPLATE.read_text()).substitute(fields)


def write_card(folder: Path, training: dict, quality: dict, held: dict, guidance: list[dict]) -> Path:
    path = folder / "README.md"
    path.write_text(render_card(training, quality, held, guidance))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    folder = reference_var_path()
    pipe = load_reference_var_pipeline()
    training = json.loads((folder / "training.json").read_text())
    masks = calibrate(pipe)
    quality = measure(pipe, seeds=args.seeds, masks=masks)
    held = class_image_loss(pipe)
    quality["class_image_cross_entropy"] = held
    guidance = guidance_sweep(pipe, masks)
    quality["guidance_sweep"] = guidance
    (folder / "quality.json").write_text(json.dumps(quality, indent=1))
    loss_png(training["history"], folder / "loss.png")
    sample_grid(pipe, masks, folder / "samples.png")
    print(write_card(folder, training, quality, held, guidance))
    print(json.dumps({k: {m: (v["psnr_db"], v["identical_images"]) for m, v in d.items() if "psnr_db" in v}
                      for k, d in quality["parts"].items()}), held)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
