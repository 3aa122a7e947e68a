"""Trained reference models: data, autoencoder, loading, and the offline quality fixtures (dense vs RainFusion).

Thresholds come from measurements recorded in BENCHMARKS.md ("Reference models: RainFusion fidelity") and the
model cards; each sits below the measured value with a margin, never at a value that cannot fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_attn.reference_models import (REFERENCE_MODELS, build_reference_pipeline, load_reference_pipeline,
                                             weights_path)
from diffusers_attn.reference_models.autoencoder import PixelShuffleAutoencoder
from diffusers_attn.reference_models.card import render_card
from diffusers_attn.reference_models.data import caption_vocabulary, render_clip, random_spec, sample_batch
from diffusers_attn.reference_models.quality import fidelity_sweep, run, summarize

SPARSITIES = [0.6, 0.75, 0.9]
QUALITY_PROMPTS = (
    "red square moves right over checker",
    "blue circle moves down over stripes",
    "yellow triangle spins over dots",
)


@pytest.fixture(scope="module", params=REFERENCE_MODELS)
def ref(request):
    torch.set_num_threads(1)
    return request.param, load_reference_pipeline(request.param)


#: Measured on all 6 prompts of the model cards (``python -m diffusers_attn.reference_models.card``) and the
#: thresholds derived from them. ``sparse_share``: sparse share of ARM's non-fallback head-calls at the default
#: threshold. ``t0``: sparsity 0.6 with ``arm_threshold=0`` and ``arm_rule="argmax"`` (every head past warm-up
#: sparse with its best pattern).
MEASURED = {
    "ref-cogvideox": dict(sparse_share=0.22, t0_psnr_min=35.38, t0_ssim_min=0.9743, t0_density=0.889,
                          t08_sparse_share=0.66, t08_psnr_min=37.80, t08_ssim_min=0.9911),
    "ref-hunyuan": dict(sparse_share=0.02, t0_psnr_min=24.75, t0_ssim_min=0.8944, t0_density=0.831,
                        t08_sparse_share=0.24, t08_psnr_min=30.71, t08_ssim_min=0.9691),
}
THRESHOLDS = {
    # cogvideox meets the fidelity target (>= 30 dB, SSIM >= 0.9 at sparsity 0.6) even with every head sparse
    "ref-cogvideox": dict(sparse_share=0.10, t0_psnr_min=30.0, t0_ssim_min=0.95, t0_density=0.9,
                          t08_sparse_share=0.5),
    # hunyuan does NOT meet it with every head sparse (measured 24.75 dB worst): a regression guard only; at ARM
    # threshold 0.8 it does, with a quarter of the head-calls sparse (30.7 dB worst of 6 prompts, 32.5 dB on the
    # 3 prompts the test runs)
    "ref-hunyuan": dict(sparse_share=0.01, t0_psnr_min=22.0, t0_ssim_min=0.85, t0_density=0.85,
                        t08_sparse_share=0.15),
}


@pytest.fixture(scope="module")
def sweeps(ref):
    """Sweeps over three prompts sharing the dense runs: ARM at sparsity 0.6 with the library defaults
    (threshold 0.9) and with threshold 0; the forced spatial and temporal patterns at 0.6 / 0.75 / 0.9."""
    name, spec = ref
    cache: dict = {}
    out = {"arm": summarize(fidelity_sweep(spec, [0.6], QUALITY_PROMPTS, dense_cache=cache))}
    out["arm_t0"] = summarize(fidelity_sweep(spec, [0.6], QUALITY_PROMPTS, dense_cache=cache, arm_threshold=0.0,
                                             arm_rule="argmax"))
    out["arm_t08"] = summarize(fidelity_sweep(spec, [0.6], QUALITY_PROMPTS, dense_cache=cache, arm_threshold=0.8))
    for pattern in ("spatial", "temporal"):
        out[pattern] = summarize(fidelity_sweep(spec, SPARSITIES, QUALITY_PROMPTS, dense_cache=cache,
                                                force_pattern=pattern))
    return name, out


def test_data_is_deterministic_and_captioned():
    a, ca = sample_batch(3, 4)
    b, cb = sample_batch(3, 4)
    c, _ = sample_batch(4, 4)
    assert torch.equal(a, b) and ca == cb and not torch.equal(a, c)
    assert a.shape == (4, 9, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    vocab = set(caption_vocabulary())
    assert len(vocab) == 225 and all(x in vocab for x in ca)
    # every clip changes over time (moves, spins or changes colour)
    assert ((a[:, -1] - a[:, 0]).abs().amax(dim=(1, 2, 3)) > 0.3).all()


def test_moving_shape_moves_the_right_way():
    import dataclasses

    rng = np.random.default_rng(0)
    spec = dataclasses.replace(random_spec(rng), motion="right", x0=0.25, y0=0.5, colour="red", background="dots")
    clip = render_clip(spec)
    red = (clip[:, 0] > 0.5) & (clip[:, 1] < 0) & (clip[:, 2] < 0)  # (F, S, S) red-ish pixels
    cols = [np.nonzero(f)[1].mean() for f in red]
    assert cols[-1] - cols[0] > 0.35 * 32  # travels ~0.45 of the frame to the right


def test_pixel_autoencoder_is_lossless_and_shaped_for_the_pipelines():
    vae = PixelShuffleAutoencoder(scaling_factor=3.0, shift_factor=-0.25)
    x = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 12, 5, 16, 16)
    back = vae.decode(z / vae.config.scaling_factor).sample
    assert (back - x).abs().max() < 1e-6
    assert vae.spatial_compression_ratio == 2 and vae.temporal_compression_ratio == 1
    with pytest.raises(ValueError, match=r"expects \(B, 12, F, H, W\)"):
        vae.decode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 2, 9, 9))


def test_unknown_reference_model_is_refused():
    with pytest.raises(ValueError, match="available: ref-cogvideox"):
        load_reference_pipeline("ref-nope")


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference_models.train"):
        build_reference_pipeline("ref-cogvideox", path=tmp_path)


def test_trained_model_follows_the_caption(ref):
    """The shipped weights are trained: the colour word decides the shape's colour (a random or broken model
    fails this), and the output moves."""
    name, spec = ref
    shares = {}
    for colour in ("red", "blue"):
        v = run(spec, f"{colour} circle moves right over dots", seed=1)  # (F, H, W, 3) in [0, 1]
        r, b = v[..., 0], v[..., 2]
        shares[colour] = (float(((r > 0.6) & (b < 0.4)).mean()), float(((b > 0.6) & (r < 0.4)).mean()))
        assert np.abs(v[-1] - v[0]).mean() > 0.02, f"{name}: output does not change over time"
    assert shares["red"][0] > 0.02 and shares["red"][0] > 4 * shares["red"][1], shares
    assert shares["blue"][1] > 0.02 and shares["blue"][1] > 4 * shares["blue"][0], shares


def test_rainfusion_fidelity_at_sparsity_0_6_library_defaults(sweeps):
    """Sparsity 0.6, default dense warm-up and ARM threshold: PSNR >= 30 dB and SSIM >= 0.9 vs dense (same seed)
    for the worst prompt, with some heads actually sparse. Measured (6 prompts): ref-cogvideox worst 45.4 dB /
    0.998, video density 0.975; ref-hunyuan worst 31.3 dB / 0.969, density 0.997 (ARM keeps most heads dense on
    these small grids: see the model cards)."""
    name, runs = sweeps
    row = runs["arm"][0]
    assert row["psnr_min_db"] >= 30.0, (name, row)
    assert row["ssim_min"] >= 0.9, (name, row)
    assert row["video_density"] < 1.0, (name, row)


def test_rainfusion_fidelity_with_every_head_sparse(sweeps):
    """Sparsity 0.6 with ``arm_threshold=0`` and the argmax rule, so every head past warm-up runs sparse with its
    best pattern: the real test of the sparse path. Thresholds per model in THRESHOLDS, from MEASURED."""
    name, runs = sweeps
    row, lim = runs["arm_t0"][0], THRESHOLDS[name]
    assert row["video_density"] <= lim["t0_density"], (name, row)
    assert row["psnr_min_db"] >= lim["t0_psnr_min"], (name, row)
    assert row["ssim_min"] >= lim["t0_ssim_min"], (name, row)


def test_rainfusion_fidelity_with_a_real_mix_at_threshold_0_8(sweeps):
    """ARM threshold 0.8 (a head goes sparse when its best pattern keeps >= 80% of the sampled mass; the default
    0.9 keeps most heads of these small models dense): the target 30 dB / SSIM 0.9 at sparsity 0.6 with a real
    share of sparse head-calls, on both models. Measured in MEASURED (``t08_*``, 6 prompts)."""
    name, runs = sweeps
    row, lim = runs["arm_t08"][0], THRESHOLDS[name]
    hist = row["patterns"]
    sparse = sum(hist.get(p, 0) for p in ("spatial", "temporal", "textural"))
    assert row["psnr_min_db"] >= 30.0 and row["ssim_min"] >= 0.9, (name, row)
    assert sparse >= lim["t08_sparse_share"] * (sparse + hist.get("dense", 0)), (name, hist)
    assert row["video_density"] < runs["arm"][0]["video_density"], (name, row)  # more sparse than the default


def test_arm_chooses_a_mix_of_patterns(sweeps):
    """At the default threshold ARM keeps some heads dense and makes others sparse."""
    name, runs = sweeps
    hist = runs["arm"][0]["patterns"]
    sparse = sum(hist.get(p, 0) for p in ("spatial", "temporal", "textural"))
    assert hist.get("dense", 0) > 0 and sparse > 0, (name, hist)
    assert sparse >= THRESHOLDS[name]["sparse_share"] * (sparse + hist["dense"]), (name, hist)


@pytest.mark.parametrize("mode", ["spatial", "temporal"])
def test_quality_falls_as_sparsity_rises(sweeps, mode):
    """With the pattern fixed, mean PSNR and SSIM never rise with sparsity, and fall strictly wherever the
    realized density falls (on this grid neighbouring sparsities can round to the same windows and blocks, hence
    identical outputs). ARM's own choice changes with sparsity, so it is not the controlled variable here."""
    name, runs = sweeps
    summ = runs[mode]
    for a, b in zip(summ, summ[1:]):
        assert b["video_density"] <= a["video_density"] + 1e-9, (name, mode, summ)
        if b["video_density"] < a["video_density"] - 1e-6:
            assert b["psnr_mean_db"] < a["psnr_mean_db"] and b["ssim_mean"] < a["ssim_mean"], (name, mode, summ)
        else:
            assert b["psnr_mean_db"] == pytest.approx(a["psnr_mean_db"]), (name, mode, summ)
    assert summ[-1]["video_density"] < summ[0]["video_density"] - 0.1, (name, mode, summ)
    assert summ[-1]["psnr_mean_db"] < summ[0]["psnr_mean_db"] - 3.0, (name, mode, summ)


def test_cli_compare_defaults_to_the_reference_model(tmp_path, capsys):
    from diffusers_attn.cli import main

    js = tmp_path / "c.json"
    assert main(["compare", "--steps", "4", "--no-warmup", "--out", str(tmp_path / "c.mp4"), "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["settings"]["model"] == "ref-cogvideox"
    assert rep["settings"]["transformer"] == "CogVideoXTransformer3DModel"
    assert "trained reference model" in capsys.readouterr().out


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_model_card_is_the_template_filled_from_the_stored_inputs(name):
    """The shipped card is ``card_template.md`` + ``card_notes/<name>.md`` filled from ``train_log.json`` and
    ``quality.json`` (the prose lives in Markdown, the numbers in the stored files)."""
    folder = weights_path(name)
    quality = json.loads((folder / "quality.json").read_text())
    log = json.loads((folder / "train_log.json").read_text())
    assert render_card(name, quality, log) == (folder / "README.md").read_text()
