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
    assert min(rep["greedy"]["token_agreement_per_scale"]) >= AGREE_MIN_GREEDY, rep


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
