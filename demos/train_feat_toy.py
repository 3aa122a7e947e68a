"""Train FEATTransformer3DModel from scratch on a procedurally generated toy video set (no download).

Each clip is a latent-space video (C x H x W per frame): one or two coloured squares moving at constant velocity
and bouncing off the borders, on a zero background. Training is DDPM epsilon prediction (1000 linear steps, as in
FEAT; the learned-sigma channels are left untrained here). Every ``--ckpt-every`` steps the script saves a
checkpoint of the EMA weights (``save_pretrained``), samples a few clips with DDIM (x0 clipped to the data
range [-3, 3]) and reports their distance to the data: the mean over samples of the MSE to the nearest of 512
fresh real clips (lower is better; pure noise scores ~1; ``zeros_nn_mse`` in the log is the score of an
all-background clip, the bar samples must beat to show any squares).

This shows the loss falling and the sample distance shrinking; it is not a reproduction of the paper's FVD.

    PYTHONPATH=. python demos/train_feat_toy.py --steps 300 --out runs/feat_toy          # tiny model, CPU
    PYTHONPATH=. python demos/train_feat_toy.py --preset FEAT-S --size 16 --frames 16 --batch 8 --steps 20000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F


def toy_videos(n: int, frames: int, size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """(n, frames, channels, size, size) clips of bouncing squares."""
    out = torch.zeros(n, frames, channels, size, size)
    side = max(2, size // 4)
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
            sign = torch.randn(channels, generator=generator).sign()
            color = sign * (0.5 + torch.rand(channels, generator=generator))
            pos = torch.randint(0, size - side + 1, (2,), generator=generator)
            vel = torch.randint(-1, 2, (2,), generator=generator)
            for f in range(frames):
                y, x = int(pos[0]), int(pos[1])
                out[i, f, :, y : y + side, x : x + side] += color[:, None, None]
                for d in range(2):  # bounce
                    nxt = int(pos[d] + vel[d])
                    if nxt < 0 or nxt > size - side:
                        vel[d] = -vel[d]
                    pos[d] = pos[d] + vel[d]
    return out


@torch.no_grad()
def sample(model, scheduler_cls, n, frames, channels, size, steps, generator, device):
    sched = scheduler_cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, clip_sample_range=3.0)
    sched.set_timesteps(steps)
    x = torch.randn(n, frames, channels, size, size, generator=generator).to(device)
    for t in sched.timesteps:
        eps = model(x, t.expand(n).to(device)).sample[:, :, :channels]
        x = sched.step(eps, t, x).prev_sample
    return x.cpu()


def nn_mse(samples: torch.Tensor, real: torch.Tensor) -> float:
    d = torch.cdist(samples.flatten(1), real.flatten(1)) ** 2 / samples[0].numel()
    return float(d.min(1).values.mean())


def save_png(samples: torch.Tensor, path: str) -> None:
    from PIL import Image

    x = samples[:, :, 0]  # channel 0 of every frame: rows = clips, columns = frames
    n, f, h, w = x.shape
    grid = x.permute(0, 2, 1, 3).reshape(n * h, f * w)
    img = ((grid.clamp(-2, 2) + 2) / 4 * 255).byte().numpy()
    Image.fromarray(img).resize((f * w * 8, n * h * 8), Image.NEAREST).save(path)


def main(argv=None) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler
    from tqdm.auto import tqdm

    from diffusers_attn.pipelines.feat import FEATTransformer3DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="FEAT-S or FEAT-L (default: a tiny model)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--size", type=int, default=8, help="latent height = width")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--ema", type=float, default=0.995,
                    help="weight EMA decay used for sampling and checkpoints (0: off)")
    ap.add_argument("--out", default="runs/feat_toy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if args.preset:
        model = FEATTransformer3DModel.from_preset(args.preset, in_channels=args.channels)
    else:
        model = FEATTransformer3DModel(in_channels=args.channels, hidden_size=args.hidden, num_heads=args.heads,
                                       num_groups=args.groups)
    model.to(dev).train()
    ema_model = copy.deepcopy(model).eval() if args.ema > 0 else model
    for p in ema_model.parameters():
        p.requires_grad_(ema_model is model)
    n_params = sum(p.numel() for p in model.parameters())
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    real = toy_videos(512, args.frames, args.size, args.channels, torch.Generator().manual_seed(10_000 + args.seed))
    os.makedirs(args.out, exist_ok=True)
    log = {"params": n_params, "args": vars(args), "checkpoints": []}
    ema = None
    bar = tqdm(range(1, args.steps + 1), desc=f"FEAT toy ({n_params / 1e6:.2f}M params)")
    t0 = time.time()
    for step in bar:
        x0 = toy_videos(args.batch, args.frames, args.size, args.channels, gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(dev)
        pred = model(sched.add_noise(x0, noise, t), t).sample[:, :, : args.channels]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema_model is not model:
            with torch.no_grad():
                for pe, pm in zip(ema_model.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - args.ema)
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.set_postfix(loss=f"{ema:.4f}")
        if step == 1:
            log["first_loss"] = lv
        if step % args.ckpt_every == 0 or step == args.steps:
            model.eval()
            ck = os.path.join(args.out, f"checkpoint-{step}")
            ema_model.save_pretrained(ck)
            s = sample(ema_model, DDIMScheduler, 8, args.frames, args.channels, args.size, args.sample_steps,
                       torch.Generator().manual_seed(1), dev)
            save_png(s, os.path.join(ck, "samples.png"))
            entry = {"step": step, "loss_ema": ema, "sample_nn_mse": nn_mse(s, real), "seconds": time.time() - t0}
            log["checkpoints"].append(entry)
            tqdm.write(json.dumps(entry))
            model.train()
    noise_nn = nn_mse(torch.randn(8, args.frames, args.channels, args.size, args.size), real)
    log["noise_nn_mse"] = noise_nn
    # an all-background clip: the score of a model that learned only "mostly zeros" (compare samples to it)
    log["zeros_nn_mse"] = nn_mse(torch.zeros(1, args.frames, args.channels, args.size, args.size), real)
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump(log, f, indent=2)
    return log


if __name__ == "__main__":
    main()
