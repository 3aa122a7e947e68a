"""Full tiny pipelines (real diffusers pipeline classes, prompt embeddings, no text encoder) and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.cli import main
from diffusers_attn.context import StepTracker
from diffusers_attn.pipelines.tiny import build_tiny_pipeline

SMALL = dict(height=64, width=64, num_frames=9, num_inference_steps=4)


def gen(spec, negative=None, **kw):
    args = {**SMALL, **kw}
    out = spec.pipe(**spec.prompt_kwargs("a red fox in snow", negative), **args, output_type="pt",
                    generator=torch.Generator().manual_seed(0))
    return out.frames


@pytest.mark.parametrize("name", ["tiny-cogvideox", "tiny-cogvideox-1.5", "tiny-hunyuan"])
def test_pipeline_sparsity0_equals_stock(name):
    spec = build_tiny_pipeline(name)
    kw = {"num_frames": 13} if name == "tiny-cogvideox-1.5" else {}
    ref = gen(spec, **kw)
    apply_rainfusion(spec.pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(gen(spec, **kw), ref)
    remove_attention_acceleration(spec.pipe)
    assert torch.equal(gen(spec, **kw), ref)


def test_cogvideox_pipeline_schedule_and_stats():
    spec = build_tiny_pipeline("tiny-cogvideox")
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0.25, dense_layers=1, arm_threshold=0.0, min_video_tokens=0,
                           block_m=16, block_n=16)
    apply_rainfusion(spec.pipe, cfg)
    frames = gen(spec, num_inference_steps=8)
    assert torch.isfinite(frames).all()
    stats = get_attention_stats(spec.pipe)
    n_layers = spec.pipe.transformer.config.num_layers
    assert stats.steps == 8
    assert stats.calls == 8 * n_layers  # CFG is batched into one forward per step in CogVideoX
    assert stats.dense_fallbacks == {"dense layer (dense_layers)": 8, "dense warm-up step": 2 * (n_layers - 1)}
    assert 0 < stats.density < 1
    sparse_layers = [l for l in stats.layers if l.layer >= 1]
    assert all(l.density < 1 for l in sparse_layers)
    text = str(stats)
    assert "layer   1" in text and "dense warm-up step: 2" in text


def test_hunyuan_true_cfg_counts_each_step_once_and_new_generation_resets():
    spec = build_tiny_pipeline("tiny-hunyuan")
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0.5, dense_layers=0, arm_threshold=0.0, min_video_tokens=0,
                           block_m=16, block_n=16)
    apply_rainfusion(spec.pipe, cfg)
    gen(spec, negative="blurry", true_cfg_scale=3.0, num_inference_steps=1)  # a 1-step warm-up generation
    gen(spec, negative="blurry", true_cfg_scale=3.0, num_inference_steps=4)
    stats = get_attention_stats(spec.pipe)
    n_layers = 2  # one dual-stream + one single-stream block
    assert stats.steps == 4
    assert stats.calls == 4 * 2 * n_layers  # cond and uncond are separate forwards
    assert stats.dense_fallbacks == {"dense warm-up step": 2 * 2 * n_layers}
    assert stats.layers[0].head_patterns  # per-head pattern counts exist


def test_step_tracker():
    tr = StepTracker()
    sched = object()
    assert tr.observe(999.0, sched) is True and tr.step == 0
    assert tr.observe(999.0, sched) is False and tr.step == 0 and tr.call_in_step == 1  # uncond call
    assert tr.observe(900.0, sched) is False and tr.step == 1
    assert tr.observe(900.0, object()) is True and tr.step == 0  # new schedule = new generation
    # without a schedule: direction reversal or a repeated value restarts
    tr = StepTracker()
    for t in (1000.0, 750.0, 500.0):
        tr.observe(t)
    assert tr.step == 2
    assert tr.observe(1000.0) is True and tr.step == 0 and tr.generation == 1
    tr.observe(800.0)
    assert tr.observe(900.0) is True  # moved against the schedule


def test_cli_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp.mp4"
    js = tmp_path / "cmp.json"
    rc = main(["compare", "--model", "tiny-cogvideox", "--steps", "3", "--frames", "9", "--height", "64", "--width",
               "64", "--out", str(out),
               "--json", str(js), "--arm-threshold", "0", "--no-warmup"])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("dense:", "speedup:", "PSNR", "SSIM", "realized density", "wrote"):
        assert needle in text
    report = json.loads(js.read_text())
    assert report["settings"]["model"] == "tiny-cogvideox"
    assert 0 < report["stats"]["density"] < 1
    assert report["dense"]["total_s"] > 0 and report["accelerated"]["total_s"] > 0
    import imageio

    frames = imageio.mimread(out)
    assert len(frames) == 9
    h, w = frames[0].shape[:2]
    assert w >= 2 * 64 and h >= 64 and np.asarray(frames[0]).std() > 0


def test_cli_bad_input_is_one_readable_line(capsys):
    assert main(["compare", "--sparsity", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "sparsity must be in [0, 1)" in err and "Traceback" not in err
    assert main(["compare", "--model", "no/such-model-anywhere", "--no-warmup"]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "tiny-cogvideox" in err


def test_real_loading_path_from_a_saved_folder(tmp_path, capsys):
    """`compare --model <folder>` goes through DiffusionPipeline.load_config/from_pretrained, the tokenizer and
    the text encoder, exactly as for a hub id (which needs internet)."""
    from diffusers_attn.pipelines.tiny import build_tiny_cogvideox

    spec = build_tiny_cogvideox(text_encoder=True)
    folder = tmp_path / "tiny-cogvideox-saved"
    spec.pipe.save_pretrained(folder)
    rc = main(["compare", "--model", str(folder), "--prompt", "a red fox runs through snow", "--steps", "2",
               "--frames", "9", "--height", "64", "--width", "64", "--min-video-tokens", "0", "--block-m", "16",
               "--block-n", "16", "--no-warmup", "--out", str(tmp_path / "o.mp4")])
    assert rc == 0
    assert "CogVideoXTransformer3DModel" in capsys.readouterr().out

    # a saved pipeline whose transformer we do not support is refused before any weights load
    import json as _json

    index = _json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (folder / "model_index.json").write_text(_json.dumps(index))
    assert main(["compare", "--model", str(folder), "--no-warmup"]) == 2
    assert "supported: CogVideoXTransformer3DModel" in capsys.readouterr().err
