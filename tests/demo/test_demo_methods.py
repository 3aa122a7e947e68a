"""The demo's LiteVAR (tiny VAR, class labels, images) and FEAT (short distillation) methods, at the runner level
(no Gradio): real pipelines built offline, CPU, seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_attn.demo import METHODS, DemoInputError, DemoRequest, DemoRunner
from diffusers_attn.demo.builtin_methods import _shade

VAR_OFF = {"masks": False, "share_cfg": False, "quant": "none"}
VIDEO = dict(model="tiny-cogvideox", prompt="a fox", steps=3, frames=9, height=64, width=64, warmup=False)


@pytest.fixture(scope="module")
def runner():
    return DemoRunner(device="cpu")


def var(prompt: str = "207, 360", **knobs) -> DemoRequest:
    return DemoRequest(model="tiny-var", method="litevar", prompt=prompt, knobs=knobs, warmup=False)


def _png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_litevar_noop_settings_give_the_dense_images(runner):
    """Masks off, no CFG sharing, no quantization: LiteVAR's processor must reproduce dense exactly."""
    res = runner.run(var(**VAR_OFF))
    dense, accel = _png(res.dense_video), _png(res.accel_video)
    assert res.is_image and dense.shape == (64, 2 * 64 + 4, 3)
    assert np.array_equal(dense, accel)
    m = res.metrics
    assert m["identical"] is True and m["psnr_db"] is None and m["ssim"] == pytest.approx(1.0)
    assert m["density"] == 1.0 and m["computed_score_share"] == 1.0
    # identical images: said in words, never an "inf" mean
    assert "identical (infinite PSNR)" in res.summary_md and "every image identical" in res.summary_md
    assert m["psnr_per_image_db"] is None and m["identical_images"] == 2 and "inf dB" not in res.summary_md


def test_litevar_default_run_images_metrics_and_cached_calibration(runner):
    first = runner.run(var())
    m = first.metrics
    assert _png(first.dense_video).shape == _png(first.accel_video).shape == (64, 132, 3)
    assert math.isfinite(m["psnr_db"]) and 0 < m["ssim"] < 1  # masks + CFG sharing change the images
    assert 0 < m["density"] < 1  # kept share of the calibrated masks
    assert m["computed_score_share"] == pytest.approx(m["density"] / 2, rel=1e-6)  # ASC: one map per CFG pair
    assert set(m["kept_share_per_scale"]) == {str(k) for k in range(6)}
    assert all(m["kept_share_per_scale"][str(k)] == 1.0 for k in range(3))  # scales 0-2 are never masked
    calib = m["method_report"]["calibration"]
    assert calib["cached"] is False and calib["calibration_labels"] == [0, 125, 250, 375, 500, 625, 750, 875]
    assert m["dense_sampling_s"] > 0 and "sampling latency" in first.dense_caption
    second = runner.run(var(prompt="1"))
    assert second.metrics["method_report"]["calibration"]["cached"] is True  # calibrated once per model
    assert second.metrics["method_report"]["mask_summary"] == m["method_report"]["mask_summary"]
    assert _png(second.dense_video).shape == (64, 64, 3)
    # the figure: block rows coloured by the masks' kept share; the run rows by the stats
    plot = first.pattern_plot[::2, ::2]
    assert plot.ndim == 3
    cell = plot[44 + 2, 84 + 2]  # block 0, scale 0: always full
    assert tuple(cell) == _shade(1.0)


def test_litevar_fake_quant_and_int8_message(runner):
    res = runner.run(var(masks=False, share_cfg=False, quant="w4a4"))
    assert res.metrics["quantized_layers"] > 0 and math.isfinite(res.metrics["psnr_db"])
    choices = next(k for k in METHODS["litevar"].knobs if k.name == "quant").choices
    if not torch.cuda.is_available():
        assert "int8" not in choices
        with pytest.raises(DemoInputError, match="'int8' is not available here: the real int8 path .* CUDA"):
            runner.run(var(quant="int8"))


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("207, 1000", r"class label '1000' is not an integer in \[0, 999\] \(this model has 1000 classes\)"),
        ("207 cat", "class labels must be non-negative integers, got 'cat'"),
        ("-3", "class labels must be non-negative integers, got '-3'"),
        ("   ", "enter one or more class labels"),
        (" ".join(["1"] * 9), "at most 8 class labels per run, got 9"),
    ],
)
def test_class_label_validation_is_readable(runner, prompt, message):
    with pytest.raises(DemoInputError, match=message):
        runner.run(var(prompt))


def test_litevar_on_a_video_model_and_feat_on_var_are_readable(runner):
    with pytest.raises(DemoInputError, match="cannot load VAR model 'tiny-cogvideox'.*tiny-var"):
        runner.run(DemoRequest(method="litevar", model="tiny-cogvideox", prompt="207", warmup=False))
    for method in ("feat", "rainfusion"):
        with pytest.raises(DemoInputError, match="'tiny-var' is a class-conditional image model .* use LiteVAR"):
            runner.run(DemoRequest(method=method, model="tiny-var", prompt="a fox", warmup=False))


def test_saved_var_folder_loads_through_the_real_loading_code(tmp_path):
    from diffusers_attn.pipelines.tiny import build_tiny_var

    build_tiny_var().save_pretrained(tmp_path / "var")
    res = DemoRunner(device="cpu").run(DemoRequest(model=str(tmp_path / "var"), method="litevar", prompt="3",
                                                   knobs=VAR_OFF, warmup=False))
    assert res.metrics["identical"] and res.metrics["settings"]["model"] == str(tmp_path / "var")
    assert "random-weight" not in res.summary_md  # not a built-in tiny model


def test_feat_short_distillation_lowers_error_and_is_reported(runner):
    res = runner.run(DemoRequest(**VIDEO, method="feat", knobs={"distill_steps": 15}))
    rep = res.metrics["method_report"]
    assert rep["distill_steps"] == 15 and rep["distill_inputs"] == 3 and rep["feat_layers"] == [0, 1]
    before, after = rep["per_layer_error_before"], rep["per_layer_error_after"]
    assert set(before) == set(after) == {"0", "1"}
    assert all(after[k] < before[k] for k in before)  # the distillation did something
    assert math.isfinite(res.metrics["psnr_db"]) and res.dense_video.endswith(".mp4")
    assert "FEAT distillation" in res.summary_md and res.pattern_plot is not None
    assert "only meaningful after distillation" in METHODS["feat"].description


def test_feat_all_softmax_layers_is_dense_and_layer_count_is_checked(runner):
    res = runner.run(DemoRequest(**VIDEO, method="feat", knobs={"distill_steps": 0, "softmax_layers": 2}))
    assert res.metrics["psnr_db"] is None  # hybrid with every layer softmax: bit for bit the stock attention
    assert res.metrics["method_report"]["feat_layers"] == []
    with pytest.raises(DemoInputError, match="Softmax layers: the model has 2 attention layers, got 3"):
        runner.run(DemoRequest(**VIDEO, method="feat", knobs={"softmax_layers": 3}))


def test_cli_compare_tiny_var_names_the_supported_route(capsys):
    from diffusers_attn import cli

    assert cli.main(["compare", "--model", "tiny-var"]) == 2
    err = capsys.readouterr().err
    assert "class-conditional VAR model" in err and "method='litevar'" in err


def test_eval_sample_refuses_the_demo_only_methods(tmp_path):
    from diffusers_attn.eval.sample import SampleConfig, sample

    def no_load(*a):
        raise AssertionError("must refuse before loading")

    with pytest.raises(ValueError, match="'feat' prepares on each demo request"):
        sample(SampleConfig(model="tiny-cogvideox", out=tmp_path, method="feat"), loader=no_load)
    with pytest.raises(ValueError, match="'litevar' is class-conditioned"):
        sample(SampleConfig(model="tiny-var", out=tmp_path, method="litevar"), loader=no_load)
