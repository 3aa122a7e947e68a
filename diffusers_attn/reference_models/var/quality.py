"""LiteVAR vs dense on ``ref-var``: PSNR / SSIM of the images and token agreement per scale, same generator.

VAR sampling is discrete: a token that flips at one scale changes every later scale's input, so a sampled image
either matches dense almost exactly or diverges. Two comparisons are therefore reported:

* ``sampled``: the pipeline's top-k / top-p sampler with the same ``torch.Generator`` seed for dense and LiteVAR
  (what a user sees);
* ``greedy``: ``top_k=1`` (argmax per scale; no randomness, so only near-ties can flip);
* ``dense_prefix_logits``: no sampling at all: both models get dense's tokens as every scale's input, and their
  guided logits are compared per scale (KL and argmax agreement), so one flip cannot cascade.

Token agreement per scale is the share of token ids equal to dense's; PSNR is over the whole batch.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...api.litevar import apply_litevar, begin_var_generation, calibrate_litevar, remove_litevar
from ...eval.metrics import psnr, ssim
from ...methods.litevar import LiteVARConfig
from . import DEFAULT_CALL
from .data import NUM_CLASSES, other_placement

#: The LiteVAR parts measured one by one and combined (the quality fixture is "all").
PARTS = ("masks", "share_cfg", "w8a8", "all")
CALIBRATION_LABELS = tuple(range(NUM_CLASSES))
EVAL_LABELS = tuple(range(NUM_CLASSES))
#: Degraded LiteVAR variants the card measures next to the real one: evidence that the fixture's metric detects
#: a worse approximation (each is a legal configuration, only a more aggressive one).
DEGRADED = {
    "all, W4A4": dict(quant="w4a4"),
    "all, 4-bit attention": dict(attn_bits=4),
    "all, masks at threshold 0.3": dict(threshold=0.3),
}


def calibrate(pipe: Any, threshold: float = 0.95, call: dict[str, Any] | None = None):
    """MDWA masks of ``pipe`` on every class (no drop table: it exists for the 10-scale layout only)."""
    c = {**DEFAULT_CALL, **(call or {})}
    return calibrate_litevar(pipe, CALIBRATION_LABELS, threshold=threshold, drop_table=None, batch_size=6,
                             guidance_scale=c["guidance_scale"], top_k=c["top_k"], top_p=c["top_p"], seed=0)


def part_config(part: str, masks: Any, **overrides: Any) -> LiteVARConfig:
    if part not in PARTS:
        raise ValueError(f"part {part!r}: choose one of {PARTS}")
    kw = dict(masks=masks if part in ("masks", "all") else None, share_cfg_attention=part in ("share_cfg", "all"),
              quant="w8a8" if part in ("w8a8", "all") else None)
    return LiteVARConfig(**{**kw, **overrides})


@torch.no_grad()
def sample(pipe: Any, labels: Sequence[int], seed: int, **call: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    c = {**DEFAULT_CALL, **call}
    out = pipe(class_labels=list(labels), generator=torch.Generator().manual_seed(seed), output_type="pt",
               return_token_ids=True, **c)
    return out.images, out.token_ids


def compare(dense: tuple[torch.Tensor, list[torch.Tensor]], fast: tuple[torch.Tensor, list[torch.Tensor]]
            ) -> dict[str, Any]:
    (a, ta), (b, tb) = dense, fast
    agree = [float((x == y).float().mean()) for x, y in zip(ta, tb)]
    same = torch.stack([torch.cat([x[i] == y[i] for x, y in zip(ta, tb)]).all() for i in range(a.shape[0])])
    return {"psnr_db": round(psnr(a, b), 2), "ssim": round(ssim(a, b), 4),
            "token_agreement_per_scale": [round(v, 4) for v in agree],
            "identical_images": f"{int(same.sum())}/{a.shape[0]}"}


@torch.no_grad()
def guided_logits_on_prefix(pipe: Any, labels: Sequence[int], token_ids: Sequence[torch.Tensor],
                            guidance_scale: float | None = None) -> list[torch.Tensor]:
    """The pipeline's CFG-guided logits per scale, with every scale's input built from ``token_ids`` (dense's
    tokens) instead of the model's own samples: a flip-free comparison of the per-scale distributions.

    Same maths as ``VARPipeline.__call__`` (CFG batch [cond; uncond], ramp ``t = g * si / (SN - 1)``, KV cache)."""
    g = DEFAULT_CALL["guidance_scale"] if guidance_scale is None else guidance_scale
    tr, vq = pipe.transformer, pipe.vqvae
    lab = torch.as_tensor(list(labels), device=tr.device)
    begin_var_generation(tr)
    B, SN = lab.shape[0], len(tr.patch_nums)
    cond = tr.class_cond(torch.cat((lab, torch.full_like(lab, tr.num_classes))))
    lvl_pos = tr.lvl_pos()
    x = tr.first_input(cond)
    teacher = vq.quantize.idx_to_var_input(list(token_ids)).to(tr.dtype)
    out = []
    tr.kv_caching(True)
    try:
        for si, (bg, ed) in enumerate(tr.begin_ends):
            logits = tr.get_logits(tr.run_blocks(x, cond, None, scale_idx=si, cfg_batch=True), cond)
            t = g * (si / (SN - 1) if SN > 1 else 1.0)
            out.append((1 + t) * logits[:B] - t * logits[B:])
            if si + 1 < SN:
                nb, ne = tr.begin_ends[si + 1]
                x = (tr.word_embed(teacher[:, nb - 1 : ne - 1]) + lvl_pos[:, nb:ne]).repeat(2, 1, 1)
    finally:
        tr.kv_caching(False)
    return out


def logit_fidelity(dense: Sequence[torch.Tensor], fast: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per scale: mean KL(dense || fast) of the softmax (nats/token) and top-1 (argmax) agreement."""
    kl = [float(F.kl_div(f.log_softmax(-1), d.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())
          for d, f in zip(dense, fast)]
    top1 = [float((d.argmax(-1) == f.argmax(-1)).float().mean()) for d, f in zip(dense, fast)]
    return {"kl_per_scale": [round(v, 5) for v in kl], "top1_agreement_per_scale": [round(v, 4) for v in top1]}


def measure(pipe: Any, labels: Sequence[int] = EVAL_LABELS, seeds: Sequence[int] = (0, 1),
            parts: Sequence[str] = PARTS, masks: Any = None, threshold: float = 0.95) -> dict[str, Any]:
    """Every LiteVAR part vs dense, sampled (per seed) and greedy. Returns a JSON-able report."""
    t0 = time.perf_counter()
    masks = masks if masks is not None else calibrate(pipe, threshold)
    report: dict[str, Any] = {"labels": list(labels), "seeds": list(seeds), "call": dict(DEFAULT_CALL),
                              "mask_threshold": threshold, "kept_share_per_scale": {
                                  str(k): round(masks.kept_share(k), 4) for k in sorted(masks.widths)},
                              "parts": {}}
    modes = {f"sampled_seed{s}": (s, {}) for s in seeds}
    modes["greedy"] = (0, {"top_k": 1})
    dense = {m: sample(pipe, labels, s, **kw) for m, (s, kw) in modes.items()}
    prefix = dense[f"sampled_seed{seeds[0]}"][1]
    dense_logits = guided_logits_on_prefix(pipe, labels, prefix)
    for part in parts:
        apply_litevar(pipe, part_config(part, masks))
        try:
            report["parts"][part] = {m: compare(dense[m], sample(pipe, labels, s, **kw))
                                     for m, (s, kw) in modes.items()}
            report["parts"][part]["dense_prefix_logits"] = logit_fidelity(
                dense_logits, guided_logits_on_prefix(pipe, labels, prefix))
        finally:
            remove_litevar(pipe)
    # Two reference points. Sampler noise: dense vs dense with another seed (how much the sampler alone moves an
    # image of this near-deterministic model). Wrong image: dense vs dense of the same shape and colour at another
    # placement (what a LiteVAR figure near complete divergence would look like).
    s0 = seeds[0]
    report["floor_dense_vs_dense_other_seed"] = compare(dense[f"sampled_seed{s0}"], sample(pipe, labels, s0 + 100))
    report["floor_other_placement"] = compare(dense[f"sampled_seed{s0}"],
                                              sample(pipe, [other_placement(c) for c in labels], s0))
    report["degraded"] = {}
    for name in DEGRADED:
        apply_litevar(pipe, degraded_config(pipe, masks, name))
        try:
            report["degraded"][name] = {m: compare(dense[m], sample(pipe, labels, s, **kw_))
                                        for m, (s, kw_) in modes.items()}
        finally:
            remove_litevar(pipe)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def degraded_config(pipe: Any, masks: Any, name: str) -> LiteVARConfig:
    """The "all" configuration with the :data:`DEGRADED` change ``name`` (recalibrating masks if it names a
    threshold)."""
    kw = dict(DEGRADED[name])
    mk = calibrate(pipe, kw.pop("threshold")) if "threshold" in kw else masks
    return part_config("all", mk, **kw)


def guidance_sweep(pipe: Any, masks: Any, guidances: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
                   labels: Sequence[int] = EVAL_LABELS, seed: int = 0) -> list[dict[str, Any]]:
    """LiteVAR "all" (``masks`` as given, calibrated once) vs dense and the sampler-noise reference (dense, another
    seed) per CFG scale.

    CFG extrapolates ``(1 + t) cond - t uncond`` with ``t`` ramping to ``guidance_scale``: on a model whose
    class-conditionals are near-deterministic, a large scale flattens the late-scale distributions, so both
    figures fall together as guidance grows."""
    rows = []
    for g in guidances:
        dense = sample(pipe, labels, seed, guidance_scale=g)
        other = sample(pipe, labels, seed + 100, guidance_scale=g)
        apply_litevar(pipe, part_config("all", masks))
        try:
            fast = sample(pipe, labels, seed, guidance_scale=g)
        finally:
            remove_litevar(pipe)
        rows.append({"guidance_scale": g, "all": compare(dense, fast), "dense_other_seed": compare(dense, other)})
    return rows
