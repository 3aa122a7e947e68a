"""Train the reference VAR: a small project ``VQVAE`` then a class-conditional ``VARTransformer``.

    python -m diffusers_attn.reference_models.var.train [--out DIR] [--vq-steps N] [--var-steps N]

Stage 1 trains the VQVAE (encoder, multi-scale residual quantizer, decoder) with the VAR recipe: straight-through
``f_hat``, codebook/commitment MSE, L1 + MSE pixel loss, and dead-code restarts (unused entries are re-seeded from
current residuals, so a 64-entry codebook stays in use). Stage 2 freezes it, tokenises the data set once and
trains the transformer with next-scale teacher-forced cross-entropy (10 % label dropout for CFG). Seeds are fixed;
``torch.set_num_threads(1)`` by default (shared CPUs; ``--threads N`` is faster, the last bits may differ); two
runs in one environment give identical weights (checked for short runs in ``tests/test_reference_var.py``; other
CPUs / torch builds may differ in the last bits).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...pipelines.var import VQVAE, VARPipeline, VARTransformer
from .data import IMAGE_SIZE, NUM_CLASSES, make_dataset

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
VQVAE_CONFIG = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=PATCH_NUMS,
                    using_sa=False, using_mid_sa=False)
VAR_CONFIG = dict(depth=4, embed_dim=128, num_heads=4, num_classes=NUM_CLASSES, vocab_size=64, z_channels=8,
                  patch_nums=PATCH_NUMS, mlp_ratio=2.0)
TRAIN_SEED = 0
N_TRAIN = 4800
DEFAULT_OUT = Path(__file__).parent / "weights" / "ref-var"


def quantize_st(vq: VQVAE, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Differentiable multi-scale residual quantisation (same maths as ``VectorQuantizer2.f_to_idx``).

    Returns the straight-through ``f_hat``, the VQ loss, ids per scale and the residual vectors seen (restarts)."""
    q = vq.quantize
    B, C, H, W = f.shape
    SN = len(q.patch_nums)
    f_rest, f_hat = f.detach(), torch.zeros_like(f)
    cb = q.embedding.weight
    ids, seen = [], []
    for si, pn in enumerate(q.patch_nums):
        z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        seen.append(z)
        idx = torch.cdist(z, cb.detach()).argmin(1)
        h = cb[idx].view(B, pn, pn, C).permute(0, 3, 1, 2)
        if si != SN - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = q.phi(si)(h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        ids.append(idx.view(B, -1))
    vq_loss = F.mse_loss(f_hat, f.detach()) + 0.25 * F.mse_loss(f, f_hat.detach())
    return f + (f_hat - f).detach(), vq_loss, ids, torch.cat(seen)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + base * 0.05


def train_vqvae(x: torch.Tensor, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0,
                log: list | None = None) -> VQVAE:
    torch.manual_seed(seed)
    vq = VQVAE(**VQVAE_CONFIG).to(x.device)
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    V = vq.config.vocab_size
    usage = torch.zeros(V, device=x.device)
    bar = tqdm(range(steps), desc="VQVAE", mininterval=5)
    for step in bar:
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr)
        img = x[torch.randint(0, len(x), (batch,), generator=g).to(x.device)]
        f = vq.encode_to_f(img)
        f_hat, vq_loss, ids, seen = quantize_st(vq, f)
        rec = vq.decoder(vq.post_quant_conv(f_hat))
        rec_loss = F.l1_loss(rec, img) + F.mse_loss(rec, img)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(torch.cat([i.flatten() for i in ids]), minlength=V).float()
        if (step + 1) % 50 == 0 and step < steps * 0.8:  # restart dead codes from current residual vectors
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                pick = seen[torch.randint(0, len(seen), (len(dead),), generator=g).to(x.device)].detach()
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = pick
            usage.zero_()
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log.append({"step": step, "rec": round(rec_loss.item(), 5), "vq": round(vq_loss.item(), 5)})
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{vq_loss.item():.4f}", refresh=False)
    return vq.eval()


@torch.no_grad()
def tokenize(vq: VQVAE, x: torch.Tensor, batch: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token ids per scale and the teacher-forcing inputs (N, L - 1, Cvae) of images ``x``."""
    ids = [vq.img_to_idx(x[i : i + batch]) for i in range(0, len(x), batch)]
    ids = [torch.cat(t) for t in zip(*ids)]
    return ids, vq.quantize.idx_to_var_input(ids)


def teacher_forced_loss(tr: VARTransformer, labels: torch.Tensor, ids: list[torch.Tensor],
                        teacher: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-scale cross-entropy over all tokens of all scales."""
    logits = tr(labels, teacher, label_drop_mask=drop)
    target = torch.cat(ids, 1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def train_var(labels: torch.Tensor, ids: list[torch.Tensor], teacher: torch.Tensor, steps: int, batch: int = 48,
              lr: float = 1e-3, seed: int = 0, log: list | None = None) -> VARTransformer:
    torch.manual_seed(seed)
    tr = VARTransformer(**VAR_CONFIG).to(labels.device).train()
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.02, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="VAR", mininterval=5)
    for step in bar:
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr)
        sel = torch.randint(0, len(labels), (batch,), generator=g).to(labels.device)
        drop = (torch.rand(batch, generator=g) < 0.1).to(labels.device)
        loss = teacher_forced_loss(tr, labels[sel], [i[sel] for i in ids], teacher[sel], drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 2.0)
        opt.step()
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log.append({"step": step, "ce": round(loss.item(), 5)})
        bar.set_postfix(ce=f"{loss.item():.4f}", refresh=False)
    return tr.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vq-steps", type=int, default=800)
    ap.add_argument("--var-steps", type=int, default=1500)
    ap.add_argument("--device", default="cpu", help="cpu (reference) or cuda (faster; not bit-identical)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: shared CPUs, bit-reproducible)")
    ap.add_argument("--vq-from", type=Path, default=None, help="reuse a trained VQVAE folder (skip stage 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    x, y = make_dataset(N_TRAIN, TRAIN_SEED)
    x, y = x.to(args.device), y.to(args.device)
    print(f"data: {len(x)} images {IMAGE_SIZE}px, {NUM_CLASSES} classes ({time.time() - t0:.1f}s)", flush=True)
    history: dict = {"vq": [], "var": []}
    t1 = time.time()
    if args.vq_from is not None:
        vq = VQVAE.from_pretrained(args.vq_from).eval()
    else:
        vq = train_vqvae(x, args.vq_steps, log=history["vq"])
    vq_s = time.time() - t1
    with torch.no_grad():
        rec = torch.cat([vq(x[i : i + 200]) for i in range(0, 400, 200)])
        mse = F.mse_loss(rec.add(1).div(2), x[:400].add(1).div(2)).item()
    print(f"VQVAE done in {vq_s:.0f}s: reconstruction PSNR {10 * math.log10(1 / mse):.2f} dB", flush=True)
    ids, teacher = tokenize(vq, x)
    t2 = time.time()
    tr = train_var(y, ids, teacher, args.var_steps, log=history["var"])
    var_s = time.time() - t2
    pipe = VARPipeline(tr.cpu(), vq.cpu())
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out)
    info = {"vq_steps": 0 if args.vq_from else args.vq_steps, "var_steps": args.var_steps, "vq_seconds": round(vq_s),
            "var_seconds": round(var_s), "vq_recon_psnr_db": round(10 * math.log10(1 / mse), 2),
            "n_train": N_TRAIN, "device": args.device, "threads": args.threads, "train_seed": TRAIN_SEED,
            "torch": torch.__version__, "history": history}
    (args.out / "training.json").write_text(json.dumps(info))
    print(f"saved to {args.out} (VQVAE {vq_s:.0f}s, VAR {var_s:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
