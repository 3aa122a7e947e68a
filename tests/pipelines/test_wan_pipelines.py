"""Tiny Wan pipelines (real WanPipeline, prompt embeddings): stock at sparsity 0, Wan 2.2's two experts (one step
counter across the boundary switch, stats per expert, removal of both), diffusers caches, the real loading path."""

from __future__ import annotations

import pytest
import torch

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration
from diffusers_attn.cli import main
from diffusers_attn.pipelines.tiny import build_tiny_pipeline, build_tiny_wan

SMALL = dict(height=64, width=64, num_frames=13, num_inference_steps=4)  # latent grid 4 x 4 x 4 post-patch
SPARSE = dict(arm_threshold=0.0, min_video_tokens=0, block_m=16, block_n=16, dense_layers=0)


def gen(spec, **kw):
    out = spec.pipe(**spec.prompt_kwargs("a red fox in snow"), **{**SMALL, **kw}, output_type="pt",
                    generator=torch.Generator().manual_seed(0))
    return out.frames


def _ours(transformer):
    return [p for p in transformer.attn_processors.values() if type(p).__module__.startswith("diffusers_attn")]


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan2.2"])
def test_pipeline_sparsity0_equals_stock_and_remove_restores(name):
    spec = build_tiny_pipeline(name)
    ref = gen(spec)
    apply_rainfusion(spec.pipe, RainFusionConfig(sparsity=0.0))
    experts = [spec.pipe.transformer] + ([spec.pipe.transformer_2] if name == "tiny-wan2.2" else [])
    assert all(len(_ours(t)) == 2 for t in experts)  # attn1 of both blocks, in every expert
    assert torch.equal(gen(spec), ref)
    assert remove_attention_acceleration(spec.pipe) is True
    assert all(not _ours(t) for t in experts)
    assert torch.equal(gen(spec), ref)


def test_two_experts_count_steps_across_the_switch():
    """Wan 2.2 A14B layout: the high-noise expert runs the steps with t >= boundary, the low-noise one the rest.
    One step counter spans both: the warm-up (first step) falls in the first expert only and the dense tail (last
    step) in the second; separate counters would put a warm-up step into the second expert instead."""
    spec = build_tiny_pipeline("tiny-wan2.2")
    pipe = spec.pipe
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=1, dense_tail_steps=1, **SPARSE)
    apply_rainfusion(pipe, cfg)
    gen(spec, num_inference_steps=1)  # a previous generation: its stats must not leak into the next
    frames = gen(spec, num_inference_steps=6)
    assert torch.isfinite(frames).all()
    ts = pipe.scheduler.timesteps
    n_high = int((ts >= pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps).sum())
    assert 2 <= n_high <= 4, ts  # both experts run more than one step
    stats = get_attention_stats(pipe, log=False)
    per = stats.per_transformer
    assert set(per) == {"transformer", "transformer_2"}
    calls = 2 * 2  # cond and uncond forwards x 2 self-attention layers per step
    assert per["transformer"].calls == n_high * calls and per["transformer_2"].calls == (6 - n_high) * calls
    assert per["transformer"].dense_fallbacks == {"dense warm-up step": calls}
    assert per["transformer_2"].dense_fallbacks == {"dense tail step": calls}
    assert stats.steps == 6 and per["transformer"].steps == n_high
    assert stats.calls == 6 * calls and stats.dense_fallbacks == {"dense warm-up step": calls,
                                                                  "dense tail step": calls}
    assert per["transformer"].density < 1 and per["transformer_2"].density < 1 and 0 < stats.density < 1
    assert "[transformer_2]" in str(stats) and stats.to_dict()["per_transformer"]["transformer_2"]["calls"]
    # a new generation starts both experts' stats afresh
    gen(spec, num_inference_steps=4)
    assert get_attention_stats(pipe, log=False).steps == 4


@pytest.mark.parametrize("kind", ["fbc", "pab"])
def test_rainfusion_composes_with_diffusers_caches(kind):
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    spec = build_tiny_pipeline("tiny-wan")
    pipe = spec.pipe
    if kind == "fbc":
        config = FirstBlockCacheConfig(threshold=1e6)
    else:
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                 spatial_attention_timestep_skip_range=(-1, 1001),
                                                 current_timestep_callback=lambda: pipe.current_timestep)
    pipe.transformer.enable_cache(config)
    cache_only = gen(spec)
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(gen(spec), cache_only)
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0, **SPARSE))
    out = gen(spec)
    stats = get_attention_stats(pipe, log=False)
    assert torch.isfinite(out).all() and stats.steps == 4
    assert stats.skipped_calls > 0 and stats.calls + stats.skipped_calls == 4 * 2 * 2
    assert 0 < stats.density < 1
    remove_attention_acceleration(pipe)
    assert torch.equal(gen(spec), cache_only)


def test_real_loading_path_from_a_saved_two_expert_folder(tmp_path, capsys):
    """`compare --model <folder>`: DiffusionPipeline.from_pretrained of a saved Wan 2.2 pipeline (two experts, T5
    tokenizer and encoder), RainFusion on both experts."""
    spec = build_tiny_wan(experts=2, text_encoder=True)
    folder = tmp_path / "tiny-wan2.2-saved"
    spec.pipe.save_pretrained(folder)
    js = tmp_path / "o.json"
    rc = main(["compare", "--model", str(folder), "--prompt", "a red fox runs through snow", "--steps", "4",
               "--frames", "13", "--height", "64", "--width", "64", "--min-video-tokens", "0", "--block-m", "16",
               "--block-n", "16", "--arm-threshold", "0", "--no-warmup", "--out", str(tmp_path / "o.mp4"),
               "--json", str(js)])
    assert rc == 0
    assert "WanTransformer3DModel" in capsys.readouterr().out
    import json

    report = json.loads(js.read_text())
    assert set(report["stats"]["per_transformer"]) == {"transformer", "transformer_2"}
    assert 0 < report["stats"]["density"] < 1
