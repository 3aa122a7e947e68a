"""The tiny HunyuanVideo-1.5 pipeline (diffusers' HunyuanVideo15Pipeline, guider CFG as separate cond/uncond
forwards), its compare run, and the real loading path (save_pretrained -> from_pretrained, tiny text encoders)."""

from __future__ import annotations

import json

import torch

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.cli import main
from diffusers_attn.pipelines.tiny import build_tiny_pipeline

SMALL = dict(height=64, width=64, num_frames=9, num_inference_steps=3)


def batch_kwargs(spec, prompts, negative=None):
    """Prompt embeddings of several prompts stacked into one batch (the pipeline's batch = prompt_embeds rows)."""
    parts = [spec.prompt_kwargs(p, negative) for p in prompts]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def gen(spec, prompts=("a red fox in snow",), **kw):
    args = {**SMALL, "output_type": "pt", **kw}
    return spec.pipe(**batch_kwargs(spec, prompts), **args, generator=torch.Generator().manual_seed(0)).frames


def test_pipeline_sparsity0_equals_stock_and_removal_restores():
    spec = build_tiny_pipeline("tiny-hunyuanvideo-1.5")
    ref = gen(spec)
    assert ref.shape == (1, 9, 3, 64, 64) and ref.std() > 0
    apply_rainfusion(spec.pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(gen(spec), ref)
    apply_rainfusion(spec.pipe, RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, arm_threshold=0.0,
                                                 min_video_tokens=0, block_m=16, block_n=16))
    assert not torch.equal(gen(spec), ref)
    remove_attention_acceleration(spec.pipe)
    assert torch.equal(gen(spec), ref)


def test_batch2_with_cfg_exact_at_sparsity0_and_counts_steps_once():
    """Two different prompts (different padding) in one batch, CFG through the guider: cond and uncond are two
    forwards per step, counted as one step. The VAE decodes the batch one video at a time (see
    build_tiny_hunyuan_video15: diffusers 0.42's HunyuanVideo-1.5 VAE cannot decode a batch > 1 at once)."""
    spec = build_tiny_pipeline("tiny-hunyuanvideo-1.5")
    prompts = ("a red fox in snow", 'a blue cat on water under a sign "OPEN"')
    ref = gen(spec, prompts)
    assert ref.shape[0] == 2 and not torch.equal(ref[0], ref[1])
    apply_rainfusion(spec.pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(gen(spec, prompts), ref)
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=1, dense_layers=0, arm_threshold=0.0, min_video_tokens=0,
                           block_m=16, block_n=16)
    apply_rainfusion(spec.pipe, cfg)
    gen(spec, prompts, num_inference_steps=1)  # a previous generation: the stats restart with the next one
    out = gen(spec, prompts, output_type="latent")
    stats = get_attention_stats(spec.pipe, log=False)
    n_layers = spec.pipe.transformer.config.num_layers
    assert torch.isfinite(out).all() and out.shape[0] == 2
    assert stats.steps == 3 and stats.calls == 3 * 2 * n_layers
    assert stats.dense_fallbacks == {"dense warm-up step": 2 * n_layers}
    assert 0 < stats.video_density < 1 and stats.pattern_histogram.get("textural", 0) > 0


def test_cli_compare_builtin_with_guidance_scale(tmp_path, capsys):
    js = tmp_path / "c.json"
    rc = main(["compare", "--model", "tiny-hunyuanvideo-1.5", "--steps", "2", "--frames", "9", "--height", "64",
               "--width", "64", "--arm-threshold", "0", "--guidance-scale", "3", "--no-warmup",
               "--out", str(tmp_path / "c.mp4"), "--json", str(js)])
    assert rc == 0
    assert "HunyuanVideo15Transformer3DModel" in capsys.readouterr().out
    report = json.loads(js.read_text())
    assert report["settings"]["guidance_scale"] == 3.0 and report["stats"]["calls"] > 0
    # denoising time ends where the VAE starts (the pipeline has no step callback)
    assert report["dense"]["denoise_s"] < report["dense"]["total_s"]


def test_real_loading_path_from_a_saved_folder(tmp_path, capsys):
    """`compare --model <folder>`: DiffusionPipeline.load_config / from_pretrained, the Qwen2.5-VL and ByT5 text
    paths (a quoted glyph text reaches ByT5) and the guider, exactly as for a hub id (which needs internet)."""
    from diffusers_attn.pipelines.tiny import build_tiny_hunyuan_video15

    folder = tmp_path / "tiny-hunyuanvideo-1.5-saved"
    build_tiny_hunyuan_video15(text_encoders=True).pipe.save_pretrained(folder)
    rc = main(["compare", "--model", str(folder), "--prompt", 'a red fox runs past a sign saying "HELLO"',
               "--steps", "2", "--frames", "9", "--height", "64", "--width", "64", "--min-video-tokens", "0",
               "--block-m", "16", "--block-n", "16", "--arm-threshold", "0", "--no-warmup",
               "--out", str(tmp_path / "o.mp4"), "--json", str(tmp_path / "o.json")])
    assert rc == 0
    assert "HunyuanVideo15Transformer3DModel" in capsys.readouterr().out
    report = json.loads((tmp_path / "o.json").read_text())
    assert 0 < report["stats"]["video_density"] < 1


def test_image_to_video_pipeline_exact_at_sparsity0_and_image_tokens_attended():
    """The I2V pipeline (SigLIP image tokens unmasked in the conditioning tail, the image latent as the first frame
    of the input channels): stock at sparsity 0, sparse afterwards; the image is seen (a different image changes the
    output) under RainFusion too."""
    import numpy as np
    from hv15_tiny import tiny_image_to_video_pipeline
    from PIL import Image

    spec, pipe = tiny_image_to_video_pipeline()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]

    def i2v(image):
        return pipe(image=image, **spec.prompt_kwargs("a red fox", "blurry"), num_frames=9, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    ref = i2v(images[0])
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(i2v(images[0]), ref)
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, arm_threshold=0.0,
                                            min_video_tokens=0, block_m=16, block_n=16))
    a, b = i2v(images[0]), i2v(images[1])
    stats = get_attention_stats(pipe, log=False)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert 0 < stats.video_density < 1 and stats.pattern_histogram.get("fallback", 0) == 0
