"""FEAT processor on tiny real CogVideoX / HunyuanVideo transformers: install, hybrid, masks, distillation, I/O."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, make_cogvideox, make_hunyuan, rel_err

from diffusers_attn import get_attention_stats, remove_attention_acceleration
from diffusers_attn.api.feat import FEATAttnProcessor, apply_feat, get_feat_method
from diffusers_attn.api.feat_training import (
    collect_transformer_inputs,
    distill_feat,
    load_feat_adapter,
    save_feat_adapter,
)
from diffusers_attn.kernels.biwkv import biwkv_reference
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.feat import FEATConfig, FEATMethod


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan"])
def test_hybrid_all_softmax_reproduces_stock(family):
    model = make_cogvideox("1.5") if family == "cogvideox" else make_hunyuan()
    kw = cogvideox_inputs(model, frames=6) if family == "cogvideox" else hunyuan_inputs()
    ref = run(model, kw)
    n = len(model.attn_processors) if family == "cogvideox" else 2
    apply_feat(model, FEATConfig(softmax_layers=tuple(range(n))))
    assert torch.equal(run(model, kw), ref)
    stats = get_attention_stats(model, log=False)
    assert stats.dense_fallbacks == {"softmax layer (FEATConfig.softmax_layers)": n}
    apply_feat(model, FEATConfig(softmax_layers=(0,)))  # re-install: one layer FEAT
    out = run(model, kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # untrained FEAT is *not* the softmax model
    procs = [p for p in model.attn_processors.values() if isinstance(p, FEATAttnProcessor)]
    assert len(procs) == n
    assert remove_attention_acceleration(model)
    assert torch.equal(run(model, kw), ref)


def test_install_shapes_stats_and_bad_config():
    model = make_cogvideox()
    kw = cogvideox_inputs(model, frames=3)
    ref = run(model, kw)
    apply_feat(model)
    out = run(model, kw)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    stats = get_attention_stats(model, log=False)
    assert stats.method == "feat" and stats.video_density == 0.0 and stats.calls == 2
    assert sum(stats.kernel_backends.values()) == 2
    method = get_feat_method(model)
    assert len(method.layers) == 2 and method.layer_shapes == [(2, 16), (2, 16)]
    from diffusers_attn.adapters import CogVideoXAttnProcessor

    proc = FEATAttnProcessor.for_transformer(model, method, 1)
    assert isinstance(proc, CogVideoXAttnProcessor) and proc.feat_layer is method.layers[1]
    with pytest.raises(ValueError, match="out of range"):
        apply_feat(model, FEATConfig(softmax_layers=(5,)))
    with pytest.raises(ValueError, match="scans"):
        FEATConfig(scans=("w", "x"))
    with pytest.raises(ValueError, match="unsupported transformer"):
        apply_feat(torch.nn.Linear(2, 2))


def _random_method(H, D, seed=0, **cfg):
    torch.manual_seed(seed)
    m = FEATMethod(FEATConfig(**cfg), [(H, D)])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("text_first", [True, False])
def test_text_rows_exact_and_padded_text_ignored(text_first):
    B, H, D, L, grid = 2, 2, 8, 5, (2, 3, 4)
    layout = TokenLayout.text_first(grid, L) if text_first else TokenLayout.video_first(grid, L)
    N = layout.seq_len
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    kpm = torch.ones(B, N, dtype=torch.bool)
    t0 = layout.text_offset
    kpm[1, t0 + 3 : t0 + L] = False  # batch 1: last two text tokens padded
    m = _random_method(H, D)
    out = m.feat_attention(q, k, v, layout, kpm, 0)
    # text query rows: exact masked softmax over every key
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    exact = torch.softmax(s, -1) @ v
    assert rel_err(out[:, :, t0 : t0 + L], exact[:, :, t0 : t0 + L]) < 1e-5
    # padded text keys/values have no influence on any valid row
    k2, v2 = k.clone(), v.clone()
    k2[1, :, t0 + 3 : t0 + L] += 5
    v2[1, :, t0 + 3 : t0 + L] -= 7
    out2 = m.feat_attention(q, k2, v2, layout, kpm, 0)
    assert torch.allclose(out2, out, atol=1e-5)
    # video rows: the log-scale moves them between exact softmax over the text and the FEAT video mix
    v0, v1 = layout.video_offset, layout.video_offset + layout.num_video
    with torch.no_grad():
        m.layers[0].log_scale.fill_(-1e4)
    only_text = m.feat_attention(q, k, v, layout, kpm, 0)[:, :, v0:v1]
    st = s[:, :, v0:v1, t0 : t0 + L]
    assert rel_err(only_text, torch.softmax(st, -1) @ v[:, :, t0 : t0 + L]) < 1e-5
    with torch.no_grad():
        m.layers[0].log_scale.fill_(1e4)
    only_video = m.feat_attention(q, k, v, layout, kpm, 0)[:, :, v0:v1]
    mix = m.layers[0].video_mix(k[:, :, v0:v1], v[:, :, v0:v1], q[:, :, v0:v1], grid)
    assert rel_err(only_video, mix) < 1e-5


def test_video_mix_is_chained_w_h_t_scans():
    B, H, D, grid = 1, 2, 4, (3, 4, 5)
    T, Hh, Ww = grid
    m = _random_method(H, D, channel_attention=False, conv_shift=False)
    layer = m.layers[0]
    g = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(B, H, T * Hh * Ww, D, generator=g, dtype=torch.float64) for _ in range(3))
    got = layer.video_mix(k, v, q, grid)
    C = H * D
    kg = k.permute(0, 2, 1, 3).reshape(B, T, Hh, Ww, C) * layer.key_gain.double()
    o = v.permute(0, 2, 1, 3).reshape(B, T, Hh, Ww, C)
    for j, dim in enumerate((3, 2, 1)):  # w, then h, then t
        kx, ox = kg.movedim(dim, 3), o.movedim(dim, 3)
        shp = ox.shape
        r = biwkv_reference(kx.reshape(-1, shp[3], C), ox.reshape(-1, shp[3], C),
                            layer.decay[j].double(), layer.bonus[j].double())
        o = r.reshape(shp).movedim(3, dim)
    expect = o.reshape(B, -1, H, D).permute(0, 2, 1, 3)
    assert rel_err(got, expect) < 1e-5


def test_hunyuan_padded_prompt_does_not_leak():
    model = make_hunyuan()
    kw = hunyuan_inputs()
    apply_feat(model)
    out = run(model, kw)
    kw2 = dict(kw)
    e = kw["encoder_hidden_states"].clone()
    e[0, 7:] = torch.randn(e.shape[1] - 7, e.shape[2]) * 3  # change only batch 0's padded prompt tokens
    kw2["encoder_hidden_states"] = e
    out2 = run(model, kw2)
    assert torch.allclose(out2, out, atol=1e-5)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan"])
def test_distillation_lowers_per_layer_error(family, tmp_path):
    model = make_cogvideox("1.5") if family == "cogvideox" else make_hunyuan()
    kws = ([cogvideox_inputs(model, frames=6, seed=s) for s in (1, 2)] if family == "cogvideox"
           else [hunyuan_inputs(seed=s) for s in (1, 2)])
    apply_feat(model)
    rep = distill_feat(model, kws, steps=25, lr=3e-2, progress=False)
    assert set(rep.before) == set(rep.after) and len(rep.before) == 2
    for i in rep.before:
        assert rep.after[i] < 0.8 * rep.before[i], str(rep)
    assert rep.worst_layers(1)[0] in rep.after
    # save -> fresh install -> load reproduces the distilled outputs
    out = run(model, kws[0])
    save_feat_adapter(model, tmp_path / "ad")
    remove_attention_acceleration(model)
    load_feat_adapter(model, tmp_path / "ad")
    assert torch.equal(run(model, kws[0]), out)


def test_lora_stage_and_pipeline_inputs(tmp_path):
    from diffusers_attn.pipelines.tiny import build_tiny_cogvideox

    spec = build_tiny_cogvideox(num_layers=1)
    pipe = spec.pipe
    apply_feat(pipe)
    inputs = collect_transformer_inputs(
        pipe, **spec.prompt_kwargs("a red fox"), height=32, width=32, num_frames=9, num_inference_steps=2,
        guidance_scale=1.0, output_type="latent",
    )
    assert len(inputs) == 2 and inputs[0]["hidden_states"].dim() == 5
    rep = distill_feat(pipe, inputs, steps=3, lr=1e-2, lora_rank=2, lora_steps=3, progress=False)
    assert len(rep.lora_losses) == 3 and all(math.isfinite(x) for x in rep.lora_losses)
    with torch.no_grad():
        out = pipe.transformer(**inputs[0]).sample
    save_feat_adapter(pipe, tmp_path / "ad")
    spec2 = build_tiny_cogvideox(num_layers=1)
    load_feat_adapter(spec2.pipe, tmp_path / "ad")
    with torch.no_grad():
        assert torch.allclose(spec2.pipe.transformer(**inputs[0]).sample, out, atol=1e-6)


def test_remove_feat_lora_restores_stock():
    from diffusers_attn.api.feat_training import add_lora, remove_feat_lora

    model = make_cogvideox()
    kw = cogvideox_inputs(model, frames=3)
    ref = run(model, kw)
    apply_feat(model)
    mods = add_lora(model, get_feat_method(model), rank=2)
    assert len(mods) == 6  # to_q/k/v of two layers
    with torch.no_grad():
        for m in mods:
            m.lora_b.normal_()
    remove_attention_acceleration(model)
    assert not torch.equal(run(model, kw), ref)
    assert remove_feat_lora(model) == 6
    assert torch.equal(run(model, kw), ref)


def test_triton_backend_matches_torch_in_processor():
    pytest.importorskip("triton")
    model = make_cogvideox("1.5")
    kw = cogvideox_inputs(model, batch=1, frames=6)
    apply_feat(model, FEATConfig(backend="chunked"))
    method = get_feat_method(model)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ref = run(model, kw)
    state = method.state_dict()
    apply_feat(model, FEATConfig(backend="triton"))
    get_feat_method(model).load_state_dict(state)
    assert rel_err(run(model, kw), ref) < 1e-5


def test_processor_class_for_a_later_adapter():
    """An adapter registered later (e.g. Open-Sora) gets a FEAT subclass of its own method processor."""
    from types import SimpleNamespace

    from diffusers_attn.adapters import CogVideoXAttnProcessor
    from diffusers_attn.api.feat import _PROCESSORS, _processor_cls

    adapter = SimpleNamespace(name="later-model", processor_cls=CogVideoXAttnProcessor,
                              transformer_class_name="LaterModel")
    try:
        cls = _processor_cls(adapter)
        assert issubclass(cls, FEATAttnProcessor) and issubclass(cls, CogVideoXAttnProcessor)
        assert _processor_cls(adapter) is cls
    finally:
        _PROCESSORS.pop("later-model", None)
    with pytest.raises(ValueError, match="no method processor"):
        _processor_cls(SimpleNamespace(name="bad", processor_cls=object, transformer_class_name="Bad"))
