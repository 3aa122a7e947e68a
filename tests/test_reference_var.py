"""Quality fixtures on the trained reference VAR (``ref-var``): the weights are really trained, and LiteVAR
(calibrated masks + CFG sharing + W8A8 fake-quant) stays close to dense with the same generator.

Thresholds come from the measurements in ``diffusers_attn/reference_models/var/weights/ref-var/README.md`` /
``quality.json`` (see BENCHMARKS.md, "Reference VAR"); each leaves a margin below the measured value so that an
honest regression (e.g. broken masks or quantisation) fails while run-to-run float noise does not.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_attn.reference_models.var import (DEFAULT_CALL, REFERENCE_VAR_MODELS, load_reference_var_pipeline,
                                                 reference_var_path)
from diffusers_attn.reference_models.var import quality as Q
from diffusers_attn.reference_models.var.card import heldout_loss

# Measured 2026-12-02 (ref-var README / quality.json): held-out cross-entropy trained 2.69 vs untrained 4.43 nats.
TRAINED_CE_MAX = 3.0
# Measured: 12/12 seed-3 samples have their class colour; an untrained transformer on the same VQVAE: 5/12.
COLOUR_HITS_MIN = 10
# LiteVAR "all" (masks + CFG sharing on every scale + W8A8) vs dense, classes 0-11: sampled seed 0 18.69 dB
# (seeds 0-2: 18.69 / 19.75 / 20.63), greedy 17.81 dB; the floor (dense vs an unrelated dense sample of the same
# classes) is 14.83 dB. The 30 dB is NOT met on this model (see BENCHMARKS.md "Reference VAR"); these
# thresholds sit ~1.5 dB under the measurement and ~2-3 dB above the floor.
PSNR_MIN_SAMPLED = 17.0
PSNR_MIN_GREEDY = 16.5
# Greedy token agreement of "all" at scales 0-2: 1.0 / 0.875 / 0.75 (floor 0.08 / 0.21 / 0.16).
AGREE_MIN_GREEDY = 0.6
# Parts alone, sampled seed 0: masks 24.72 dB, W8A8 23.94 dB.
PSNR_MIN_MASKS = 22.5
PSNR_MIN_W8A8 = 22.0
# Flip-free: guided logits on dense's token prefix, max KL over scales (nats/token): masks 0.043, W8A8 0.011,
# all 0.166 (CFG sharing dominates: 0.138 alone).
KL_MAX = {"masks": 0.08, "w8a8": 0.03, "all": 0.25}
# Calibrated kept attention share per maskable scale (3, 4, 5): 0.97 / 0.95 / 0.94.
KEPT_MAX = 0.99


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return load_reference_var_pipeline()


@pytest.fixture(scope="module")
def masks(pipe):
    return Q.calibrate(pipe)


def test_weights_shipped_small_and_loadable(pipe):
    folder = reference_var_path()
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 10 * 2**20, f"ref-var folder is {total / 2**20:.1f} MiB"
    assert (folder / "README.md").is_file() and (folder / "samples.png").is_file()
    tr = pipe.transformer
    assert tr.config.num_classes == 12 and tuple(tr.patch_nums) == (1, 2, 3, 4, 6, 8)
    assert all(torch.isfinite(p).all() for p in tr.parameters())
    with pytest.raises(ValueError, match="ref-var"):
        reference_var_path("ref-nope")


def test_trained_beats_untrained_on_heldout(pipe):
    # Held-out teacher-forced cross-entropy (nats/token); uniform guessing over 64 codes is log 64 = 4.16.
    held = heldout_loss(pipe, n=48)
    assert held["untrained"] > held["uniform"] - 0.3
    assert held["trained"] < held["untrained"] - 1.0, held
    assert held["trained"] < TRAINED_CE_MAX, held


def test_samples_follow_the_class_colour(pipe):
    # Classes c % 3 = 0 / 1 / 2 are red / green / blue shapes: the dominant saturated colour of each sample must
    # be its class colour (a random or class-blind model fails this).
    labels = list(range(12))
    imgs, _ = Q.sample(pipe, labels, seed=3)
    hits = 0
    for img, c in zip(imgs, labels):
        r, g, b = img
        sat = [((ch - torch.stack([x for x in (r, g, b) if x is not ch]).max(0).values) > 0.25).float().mean()
               for ch in (r, g, b)]
        hits += int(max(range(3), key=lambda i: sat[i]) == c % 3)
    assert hits >= COLOUR_HITS_MIN, f"{hits}/12 samples have their class colour"


def test_litevar_all_parts_close_to_dense(pipe, masks):
    labels = Q.EVAL_LABELS
    rep = {}
    for mode, seed, kw in (("sampled", 0, {}), ("greedy", 0, {"top_k": 1})):
        dense = Q.sample(pipe, labels, seed, **kw)
        from diffusers_attn.processors.litevar import apply_litevar, remove_litevar

        apply_litevar(pipe, Q.part_config("all", masks))
        try:
            fast = Q.sample(pipe, labels, seed, **kw)
        finally:
            remove_litevar(pipe)
        rep[mode] = Q.compare(dense, fast)
    for mode, m in rep.items():
        assert not math.isnan(m["psnr_db"])
        assert m["token_agreement_per_scale"][0] == 1.0, (mode, m)
    assert rep["sampled"]["psnr_db"] >= PSNR_MIN_SAMPLED, rep
    assert rep["greedy"]["psnr_db"] >= PSNR_MIN_GREEDY, rep
    assert min(rep["greedy"]["token_agreement_per_scale"][:3]) >= AGREE_MIN_GREEDY, rep


@pytest.mark.parametrize("part,floor", [("masks", "PSNR_MIN_MASKS"), ("w8a8", "PSNR_MIN_W8A8")])
def test_litevar_single_parts_close_to_dense(pipe, masks, part, floor):
    from diffusers_attn.processors.litevar import apply_litevar, remove_litevar

    dense = Q.sample(pipe, Q.EVAL_LABELS, 0)
    apply_litevar(pipe, Q.part_config(part, masks))
    try:
        fast = Q.sample(pipe, Q.EVAL_LABELS, 0)
    finally:
        remove_litevar(pipe)
    m = Q.compare(dense, fast)
    assert m["psnr_db"] >= globals()[floor], m


def test_masks_actually_sparsify(masks):
    kept = [masks.kept_share(k) for k in sorted(masks.widths)]
    assert all(0 < s <= 1 for s in kept) and min(kept) < KEPT_MAX, kept


def test_ref_var_is_the_demo_default_for_litevar():
    from diffusers_attn.compare import load_pipeline
    import diffusers_attn.demo  # noqa: F401  (registers the built-in methods)
    from diffusers_attn.demo.methods import METHODS

    assert METHODS["litevar"].models[0] == "ref-var" == REFERENCE_VAR_MODELS[0]
    loaded = load_pipeline("ref-var", torch.device("cpu"), torch.float32)
    assert loaded.kind == "image" and loaded.defaults == DEFAULT_CALL and loaded.num_steps == 6
    assert loaded.prompt_kwargs(loaded.default_prompt) == {"class_labels": [0, 4, 8, 9]}
    with pytest.raises(ValueError, match=r"\[0, 11\]"):
        loaded.prompt_kwargs("12")


def test_prefix_logits_reproduce_the_pipeline(pipe):
    # The flip-free comparison re-implements the sampler's loop: greedy tokens must be the argmax of its logits.
    labels = [0, 5, 10]
    _, ids = Q.sample(pipe, labels, 0, top_k=1)
    logits = Q.guided_logits_on_prefix(pipe, labels, ids)
    for si, (lg, t) in enumerate(zip(logits, ids)):
        assert torch.equal(lg.argmax(-1), t), si


@pytest.mark.parametrize("part", ["masks", "w8a8", "all"])
def test_litevar_logits_on_dense_prefix(pipe, masks, part):
    from diffusers_attn.processors.litevar import apply_litevar, remove_litevar

    labels = Q.EVAL_LABELS
    _, ids = Q.sample(pipe, labels, 0)
    dense = Q.guided_logits_on_prefix(pipe, labels, ids)
    apply_litevar(pipe, Q.part_config(part, masks))
    try:
        fast = Q.guided_logits_on_prefix(pipe, labels, ids)
    finally:
        remove_litevar(pipe)
    fid = Q.logit_fidelity(dense, fast)
    assert all(math.isfinite(v) for v in fid["kl_per_scale"])
    assert max(fid["kl_per_scale"]) <= KL_MAX[part], fid
    assert max(fid["kl_per_scale"]) > 0, "LiteVAR changed nothing: not installed?"


def test_demo_litevar_on_ref_var_runs_with_w8a8():
    # The demo page's path (no Gradio): ref-var with masks + CFG sharing + W8A8 fake-quant, two 32x32 images.
    import numpy as np
    from PIL import Image

    from diffusers_attn.demo import DemoRequest, DemoRunner

    res = DemoRunner(device="cpu").run(DemoRequest(model="ref-var", method="litevar", prompt="0, 4",
                                                   knobs={"quant": "w8a8"}, warmup=False))
    dense, accel = (np.asarray(Image.open(p).convert("RGB")) for p in (res.dense_video, res.accel_video))
    assert res.is_image and dense.shape == accel.shape == (32, 2 * 32 + 4, 3)
    m = res.metrics
    assert math.isfinite(m["psnr_db"]) and 0 < m["density"] < 1
    assert m["method_report"]["calibration"]["calibration_labels"] == [0, 1, 3, 4, 6, 7, 9, 10]


def test_data_and_training_are_deterministic():
    from diffusers_attn.reference_models.var import train as T
    from diffusers_attn.reference_models.var.data import NUM_CLASSES, make_dataset

    x, y = make_dataset(24, seed=5)
    x2, y2 = make_dataset(24, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, make_dataset(24, seed=6)[0])
    assert torch.bincount(y, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert x.shape == (24, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    a, b = T.train_vqvae(x, 3, batch=8), T.train_vqvae(x, 3, batch=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    ids, teacher = T.tokenize(a, x)
    c, d = (T.train_var(y, ids, teacher, 3, batch=8) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))
