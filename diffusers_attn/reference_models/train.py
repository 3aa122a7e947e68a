"""Train a reference model on procedural clips: ``python -m diffusers_attn.reference_models.train``.

The objective is the stock scheduler's (see :func:`noisy_inputs`): v-prediction MSE for CogVideoX
(``CogVideoXDDIMScheduler``), flow matching for HunyuanVideo (``FlowMatchEulerDiscreteScheduler``), with 10%
caption dropout (empty prompt = all-zero token embeddings, the pipeline's negative prompt) for classifier-free
guidance, AdamW with warm-up + cosine decay, gradient clipping and an EMA of
the weights (the EMA is what is saved). Seeds are fixed: clip ``i`` of step ``k`` is ``data.sample_batch(seed *
1_000_003 + k, batch)[i]``, so a run is reproducible up to floating-point non-determinism.

Writes ``<out>/transformer`` (diffusers format, EMA weights) every ``--save-every`` steps and at the end, plus
``<out>/train_log.json`` (loss per logged step and settings), ``<out>/loss.png`` and ``<out>/samples.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..pipelines.tiny import pooled_embedding, prompt_embeddings
from . import ARCH, REFERENCE_MODELS, build_reference_pipeline, weights_path
from .data import sample_batch


def encode_batch(spec, videos: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, S, S) clips -> scaled latents in the transformer's layout: CogVideoX (B, F, C, h, w),
    HunyuanVideo (B, C, F, h, w)."""
    z = spec.pipe.vae.encode(videos.to(spec.pipe.vae.shift.device).transpose(1, 2))  # (B, C, F, h, w)
    return z.transpose(1, 2).contiguous() if spec.family == "cogvideox" else z


def caption_embeddings(spec, captions: list[str], drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """Transformer text inputs for a batch (dropped captions become the empty prompt)."""
    texts = ["" if d else c for c, d in zip(captions, drop)]
    embs = [prompt_embeddings(t, spec.text_len, spec.text_dim) for t in texts]
    kw = {"encoder_hidden_states": torch.cat([e for e, _ in embs])}
    if spec.family == "hunyuan_video":
        kw["encoder_attention_mask"] = torch.cat([m for _, m in embs])
        kw["pooled_projections"] = torch.cat([pooled_embedding(t, spec.pooled_dim) for t in texts])
    return kw


def noisy_inputs(spec, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, regression target) under the stock scheduler's training objective.

    CogVideoX (DDIM, v-prediction): uniform integer timesteps, ``add_noise`` / ``get_velocity``.
    HunyuanVideo (flow matching): sigma = shift u / (1 + (shift - 1) u) for u ~ U(0, 1) (the same shift as the
    sampling schedule), x_t = (1 - sigma) x0 + sigma eps, target eps - x0, timestep 1000 sigma.
    """
    sched = spec.pipe.scheduler
    b = x0.shape[0]
    if spec.family == "cogvideox":
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        return sched.add_noise(x0, noise, t), t, sched.get_velocity(x0, noise, t)
    u = torch.rand(b, generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    shift = float(sched.config.shift)
    sigma = shift * u / (1 + (shift - 1) * u)
    s = sigma.view(b, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma * sched.config.num_train_timesteps, noise - x0


def rotary(spec, arch: dict, frames: int, device: torch.device):
    if not spec.pipe.transformer.config.use_rotary_positional_embeddings:
        return None
    return spec.pipe._prepare_rotary_positional_embeddings(arch["size"], arch["size"], frames, device)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))))


@torch.no_grad()
def sample_grid(spec, prompts: list[str], seed: int = 0, steps: int | None = None) -> torch.Tensor:
    """(len(prompts), F, H, W, 3) samples in [0, 1] with the pipeline defaults."""
    kw = dict(spec.defaults or {})
    if steps:
        kw["num_inference_steps"] = steps
    outs = []
    for p in prompts:
        out = spec.pipe(**spec.prompt_kwargs(p), **kw, output_type="np", generator=torch.Generator().manual_seed(seed))
        outs.append(torch.from_numpy(out.frames[0]))
    return torch.stack(outs)


def save_strip_png(videos: torch.Tensor, path: Path, scale: int = 3, labels: list[str] | None = None) -> None:
    """One row per video, frames left to right, upscaled (nearest) ``scale`` times, optional label above rows."""
    from PIL import Image, ImageDraw

    n, f, h, w, _ = videos.shape
    lab = 12 if labels else 0
    img = Image.new("RGB", (f * w * scale + (f - 1) * 2, n * (h * scale + lab + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    arr = (videos.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    for i in range(n):
        y = i * (h * scale + lab + 2)
        if labels:
            draw.text((2, y), labels[i], fill=(0, 0, 0))
        for j in range(f):
            tile = Image.fromarray(arr[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (j * (w * scale + 2), y + lab))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_loss_png(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    """Log-scale loss curve drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    W, H, m = 480, 240, 36
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    lo, hi = math.log10(min(losses)), math.log10(max(losses))
    hi = hi if hi > lo else lo + 1
    xs = [m + (W - 2 * m) * s / max(steps[-1], 1) for s in steps]
    ys = [H - m - (H - 2 * m) * (math.log10(v) - lo) / (hi - lo) for v in losses]
    d.rectangle([m, m, W - m, H - m], outline=(0, 0, 0))
    d.line(list(zip(xs, ys)), fill=(200, 40, 40), width=2)
    d.text((m, 8), title, fill=(0, 0, 0))
    d.text((2, m - 6), f"{10 ** hi:.3g}", fill=(0, 0, 0))
    d.text((2, H - m - 6), f"{10 ** lo:.3g}", fill=(0, 0, 0))
    d.text((W - m - 40, H - m + 6), f"step {steps[-1]}", fill=(0, 0, 0))
    d.text((m, H - m + 6), "0", fill=(0, 0, 0))
    img.save(path)


SAMPLE_PROMPTS = [
    "red square moves right over checker",
    "blue circle moves down over stripes",
    "yellow triangle spins over dots",
    "changing circle moves left over checker",
    "green square moves up over dots",
]


def train(name: str, steps: int, batch: int, lr: float, seed: int, out: Path, *, warmup: int = 100,
          ema_decay: float = 0.995, drop_prob: float = 0.1, log_every: int = 10, save_every: int = 250,
          threads: int = 1, time_limit_s: float | None = None, device: str = "cpu") -> dict:
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    arch = ARCH[name]
    dev = torch.device(device)
    spec = build_reference_pipeline(name, pretrained=False, seed=seed)
    spec.pipe.to(dev)
    model = spec.pipe.transformer
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    rope = rotary(spec, arch, arch["frames"], dev) if spec.family == "cogvideox" else None
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(seed)
    log: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema)
        model.save_pretrained(out / "transformer")
        model.load_state_dict(live)
        (out / "train_log.json").write_text(json.dumps({
            "model": name, "steps_done": step, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "warmup": warmup, "ema_decay": ema_decay, "caption_dropout": drop_prob, "params": n_params,
            "frames": arch["frames"], "size": arch["size"], "threads": threads,
            "wall_s": time.perf_counter() - t0, "log": log,
        }, indent=1))

    t0 = time.perf_counter()
    run_loss, done = 0.0, 0
    bar = tqdm(range(steps), desc=f"train {name}", mininterval=5.0)
    for step in bar:
        videos, captions = sample_batch(seed * 1_000_003 + step, batch, arch["frames"], arch["size"])
        x0 = encode_batch(spec, videos)  # random draws stay on the CPU generator (same stream on any device)
        drop = torch.rand(batch, generator=g) < drop_prob
        text = {k: v.to(dev) for k, v in caption_embeddings(spec, captions, drop).items()}
        xt, t, target = (x.to(dev) for x in noisy_inputs(spec, x0, g))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        if spec.family == "cogvideox":
            pred = model(hidden_states=xt, timestep=t, image_rotary_emb=rope, return_dict=False, **text)[0]
        else:
            pred = model(hidden_states=xt, timestep=t, return_dict=False, **text)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))  # short EMA early on
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        run_loss += float(loss.detach())
        done = step + 1
        if done % log_every == 0:
            log.append({"step": done, "loss": run_loss / log_every, "wall_s": round(time.perf_counter() - t0, 1)})
            bar.set_postfix(loss=f"{run_loss / log_every:.4f}")
            run_loss = 0.0
        if done % save_every == 0:
            save(done)
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            print(f"time limit reached after {done} steps")
            break
    save(done)
    trained = build_reference_pipeline(name, path=out)
    save_loss_png([r["step"] for r in log], [r["loss"] for r in log], out / "loss.png",
                  f"{name}: {'v-prediction' if spec.family == 'cogvideox' else 'flow-matching'} MSE "
                  f"(mean of {log_every} steps), batch {batch}")
    save_strip_png(sample_grid(trained, SAMPLE_PROMPTS), out / "samples.png", labels=SAMPLE_PROMPTS)
    return json.loads((out / "train_log.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ref-cogvideox", choices=REFERENCE_MODELS)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds (and save)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (the data and noise are drawn on the CPU)")
    p.add_argument("--out", default=None, help="output folder (default: the shipped weights folder)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else weights_path(args.model)
    res = train(args.model, args.steps, args.batch, args.lr, args.seed, out, warmup=args.warmup,
                ema_decay=args.ema_decay, save_every=args.save_every, threads=args.threads,
                time_limit_s=args.time_limit, device=args.device)
    print(f"done: {res['steps_done']} steps in {res['wall_s']:.0f} s; final loss {res['log'][-1]['loss']:.4f}; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
