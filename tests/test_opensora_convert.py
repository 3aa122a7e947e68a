"""Open-Sora 2.0 converter: the converted diffusers model equals an independent reference forward pass.

The reference below is written from the model's equations (Open-Sora 2.0, arXiv:2503.09642; the MMDiT of
https://github.com/hpcaitech/Open-Sora) on the *original* key layout: rotate-half RoPE with tiled angles, fused single-block ``v_mlp``, (shift, scale) final
adaLN. It shares no code with ``diffusers_attn.pipelines.opensora``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from diffusers_attn.pipelines.opensora import OpenSoraTransformer3DModel
from diffusers_attn.pipelines.opensora.convert import (
    CONVERSION_STEPS,
    OpenSoraConversionError,
    convert_opensora_checkpoint,
    convert_opensora_state_dict,
    transformer_from_original,
)

HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
HIDDEN = HEADS * HEAD_DIM
C, P = 4, 2  # latent channels, patch
TXT_DIM, POOLED = 24, 12
DEPTH, DEPTH_SINGLE = 2, 2


def original_state_dict(seed: int = 0, depth: int = DEPTH, depth_single: int = DEPTH_SINGLE) -> dict[str, torch.Tensor]:
    """Random weights in the original Open_Sora_v2.safetensors key layout."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def lin(name: str, out_f: int, in_f: int, std: float | None = None) -> None:
        s = std if std is not None else 1.0 / math.sqrt(in_f)
        sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) * s
        sd[f"{name}.bias"] = torch.randn(out_f, generator=g) * 0.1

    def scale(name: str) -> None:
        sd[name] = 1.0 + 0.5 * torch.randn(HEAD_DIM, generator=g)

    lin("img_in", HIDDEN, C * P * P)
    lin("cond_in", HIDDEN, (C + 1) * P * P)
    lin("txt_in", HIDDEN, TXT_DIM)
    lin("time_in.in_layer", HIDDEN, 256)
    lin("time_in.out_layer", HIDDEN, HIDDEN)
    lin("vector_in.in_layer", HIDDEN, POOLED)
    lin("vector_in.out_layer", HIDDEN, HIDDEN)
    for i in range(depth):
        b = f"double_blocks.{i}"
        for s in ("img", "txt"):
            lin(f"{b}.{s}_mod.lin", 6 * HIDDEN, HIDDEN, std=0.3)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                lin(f"{b}.{s}_attn.{proj}", HIDDEN, HIDDEN)
            scale(f"{b}.{s}_attn.norm.query_norm.scale")
            scale(f"{b}.{s}_attn.norm.key_norm.scale")
            lin(f"{b}.{s}_mlp.0", 4 * HIDDEN, HIDDEN)
            lin(f"{b}.{s}_mlp.2", HIDDEN, 4 * HIDDEN)
    for i in range(depth_single):
        b = f"single_blocks.{i}"
        lin(f"{b}.q_proj", HIDDEN, HIDDEN)
        lin(f"{b}.k_proj", HIDDEN, HIDDEN)
        lin(f"{b}.v_mlp", HIDDEN + 4 * HIDDEN, HIDDEN)
        lin(f"{b}.linear2", HIDDEN, HIDDEN + 4 * HIDDEN)
        scale(f"{b}.norm.query_norm.scale")
        scale(f"{b}.norm.key_norm.scale")
        lin(f"{b}.modulation.lin", 3 * HIDDEN, HIDDEN, std=0.3)
    lin("final_layer.adaLN_modulation.1", 2 * HIDDEN, HIDDEN, std=0.3)
    lin("final_layer.linear", C * P * P, HIDDEN)
    return sd


# ----------------------------------------------------------------------------------------- reference forward
def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _patchify(x):  # b c t (h 2) (w 2) -> b (t h w) (c 2 2), written with einsum-style indexing
    b, c, t, h, w = x.shape
    out = torch.empty(b, t, h // P, w // P, c, P, P, dtype=x.dtype)
    for ph in range(P):
        for pw in range(P):
            out[..., ph, pw] = x[:, :, :, ph::P, pw::P].permute(0, 2, 3, 4, 1)
    return out.reshape(b, -1, c * P * P)


def _unpatchify(x, t, h, w):
    b = x.shape[0]
    x = x.reshape(b, t, h, w, C, P, P)
    out = torch.empty(b, C, t, h * P, w * P, dtype=x.dtype)
    for ph in range(P):
        for pw in range(P):
            out[:, :, :, ph::P, pw::P] = x[..., ph, pw].permute(0, 4, 1, 2, 3)
    return out


def _rope_tables(pos):  # pos: (L, 3) -> cos, sin (L, HEAD_DIM); angles tiled [a, a] (rotate-half / Liger form)
    angles = []
    for axis, d in enumerate(AXES):
        i = torch.arange(d // 2, dtype=torch.float64)
        freqs = 10000.0 ** (-2.0 * i / d)
        angles.append(pos[:, axis : axis + 1].double() * freqs[None])
    a = torch.cat(angles, dim=-1)
    a = torch.cat([a, a], dim=-1)
    return a.cos(), a.sin()


def _rope(x, cos, sin):  # x: (B, L, H, D); pairs (j, j + D/2)
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def _attention(q, k, v):  # (B, L, H, D)
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(HEAD_DIM)
    return torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v).reshape(q.shape[0], q.shape[1], -1)


def _heads(x):
    return x.reshape(x.shape[0], x.shape[1], HEADS, HEAD_DIM)


def reference_forward(sd, x, cond, txt, pooled, sigma):
    """Open-Sora 2.0 MMDiT forward on the original weights, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x, cond, txt, pooled, sigma = (t.double() for t in (x, cond, txt, pooled, sigma))
    B, _, T, H, W = x.shape
    h, w = H // P, W // P
    img = _lin(_patchify(x), sd, "img_in") + _lin(_patchify(cond), sd, "cond_in")
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = (1000.0 * sigma)[:, None] * freqs[None]
    temb = torch.cat([args.cos(), args.sin()], dim=-1)
    vec = _lin(F.silu(_lin(temb, sd, "time_in.in_layer")), sd, "time_in.out_layer")
    vec = vec + _lin(F.silu(_lin(pooled, sd, "vector_in.in_layer")), sd, "vector_in.out_layer")
    txt = _lin(txt, sd, "txt_in")
    L = txt.shape[1]
    tt, hh, ww = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.cat([torch.zeros(L, 3), torch.stack([tt, hh, ww], -1).reshape(-1, 3).float()], dim=0)
    cos, sin = _rope_tables(pos)
    sv = F.silu(vec)
    gelu = lambda z: F.gelu(z, approximate="tanh")  # noqa: E731

    for i in range(DEPTH):
        b = f"double_blocks.{i}"
        im = _lin(sv, sd, f"{b}.img_mod.lin")[:, None].chunk(6, dim=-1)
        tm = _lin(sv, sd, f"{b}.txt_mod.lin")[:, None].chunk(6, dim=-1)
        qkv = {}
        for s, stream, m in (("img", img, im), ("txt", txt, tm)):
            n = (1 + m[1]) * _ln(stream) + m[0]
            q = _rms(_heads(_lin(n, sd, f"{b}.{s}_attn.q_proj")), sd[f"{b}.{s}_attn.norm.query_norm.scale"])
            k = _rms(_heads(_lin(n, sd, f"{b}.{s}_attn.k_proj")), sd[f"{b}.{s}_attn.norm.key_norm.scale"])
            qkv[s] = (q, k, _heads(_lin(n, sd, f"{b}.{s}_attn.v_proj")))
        q = _rope(torch.cat([qkv["txt"][0], qkv["img"][0]], 1), cos, sin)
        k = _rope(torch.cat([qkv["txt"][1], qkv["img"][1]], 1), cos, sin)
        o = _attention(q, k, torch.cat([qkv["txt"][2], qkv["img"][2]], 1))
        t_o, i_o = o[:, :L], o[:, L:]
        img = img + im[2] * _lin(i_o, sd, f"{b}.img_attn.proj")
        img = img + im[5] * _lin(gelu(_lin((1 + im[4]) * _ln(img) + im[3], sd, f"{b}.img_mlp.0")), sd, f"{b}.img_mlp.2")
        txt = txt + tm[2] * _lin(t_o, sd, f"{b}.txt_attn.proj")
        txt = txt + tm[5] * _lin(gelu(_lin((1 + tm[4]) * _ln(txt) + tm[3], sd, f"{b}.txt_mlp.0")), sd, f"{b}.txt_mlp.2")

    xs = torch.cat([txt, img], dim=1)
    for i in range(DEPTH_SINGLE):
        b = f"single_blocks.{i}"
        shift, sc, gate = _lin(sv, sd, f"{b}.modulation.lin")[:, None].chunk(3, dim=-1)
        n = (1 + sc) * _ln(xs) + shift
        q = _rope(_rms(_heads(_lin(n, sd, f"{b}.q_proj")), sd[f"{b}.norm.query_norm.scale"]), cos, sin)
        k = _rope(_rms(_heads(_lin(n, sd, f"{b}.k_proj")), sd[f"{b}.norm.key_norm.scale"]), cos, sin)
        vm = _lin(n, sd, f"{b}.v_mlp")
        v, mlp = vm[..., :HIDDEN], vm[..., HIDDEN:]
        o = _attention(q, k, _heads(v))
        xs = xs + gate * _lin(torch.cat([o, gelu(mlp)], dim=-1), sd, f"{b}.linear2")
    img = xs[:, L:]
    shift, sc = _lin(sv, sd, "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    out = _lin((1 + sc) * _ln(img) + shift, sd, "final_layer.linear")
    return _unpatchify(out, T, h, w)


def _inputs(seed=1, B=2, T=3, H=4, W=6, L=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(B, C, T, H, W, generator=g),
        condition=torch.randn(B, C + 1, T, H, W, generator=g),
        encoder_hidden_states=torch.randn(B, L, TXT_DIM, generator=g),
        pooled_projections=torch.randn(B, POOLED, generator=g),
        timestep=torch.rand(B, generator=g),
    )


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _ref(sd, inputs):
    return reference_forward(sd, inputs["hidden_states"], inputs["condition"], inputs["encoder_hidden_states"],
                             inputs["pooled_projections"], inputs["timestep"])


def _model(sd, disable=()):
    return transformer_from_original(sd, config_overrides={"axes_dims_rope": AXES}, disable_steps=disable)


# ----------------------------------------------------------------------------------------- tests
def test_converted_model_equals_reference_forward():
    sd = original_state_dict()
    inputs = _inputs()
    model = _model(sd)
    cfg = model.config
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.in_channels) == (DEPTH, DEPTH_SINGLE, HEADS, C)
    ref = _ref(sd, inputs)
    out = _run(model, inputs)
    assert out.shape == inputs["hidden_states"].shape
    assert rel_err(out, ref) <= 1e-5
    # condition=None is the zero condition with cond_in's bias still applied
    zero = dict(inputs, condition=torch.zeros_like(inputs["condition"]))
    assert rel_err(_run(model, dict(inputs, condition=None)), _ref(sd, zero)) <= 1e-5


@pytest.mark.parametrize("step", [s for s in CONVERSION_STEPS if s != "single_split"])
def test_each_numeric_conversion_step_is_load_bearing(step):
    """Dropping any one weight transform gives a model that disagrees with the reference by far more than 1e-5."""
    sd = original_state_dict()
    inputs = _inputs()
    ref = _ref(sd, inputs)
    err = rel_err(_run(_model(sd, disable=(step,)), inputs), ref)
    assert err > 1e-2, f"{step} disabled still matches (err {err:.2e}): the test could not detect its absence"


def test_single_split_is_load_bearing():
    with pytest.raises(OpenSoraConversionError, match="shape mismatch.*single_transformer_blocks.0.attn.to_v"):
        _model(original_state_dict(), disable=("single_split",))


def test_converter_writes_streamed_diffusers_folder(tmp_path):
    from safetensors.torch import save_file

    sd = original_state_dict(seed=3)
    src = tmp_path / "Open_Sora_v2.safetensors"
    save_file(sd, str(src))
    out = convert_opensora_checkpoint(src, tmp_path / "transformer", max_shard_size="40KB",
                                      config_overrides={"axes_dims_rope": AXES})
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    model = OpenSoraTransformer3DModel.from_pretrained(str(out)).eval()
    inputs = _inputs(seed=4, T=2, H=6, W=2)
    assert rel_err(_run(model, inputs), _ref(sd, inputs)) <= 1e-5
    # same result as the in-memory path, bf16 cast honoured
    _, conv = convert_opensora_state_dict(sd, dtype=torch.bfloat16, config_overrides={"axes_dims_rope": AXES})
    assert all(v.dtype == torch.bfloat16 for v in conv.values())


# ----------------------------------------------------------------------------------------- error paths
def test_wrong_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        transformer_from_original(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(OpenSoraConversionError, match="not a readable safetensors file"):
        transformer_from_original(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(OpenSoraConversionError, match="not an Open-Sora 2.0 MMDiT checkpoint.*img_in.weight"):
        transformer_from_original(other)


def test_missing_and_unexpected_keys_are_reported():
    sd = original_state_dict()
    del sd["double_blocks.1.txt_attn.k_proj.bias"]
    with pytest.raises(OpenSoraConversionError, match=r"1 missing key\(s\): double_blocks.1.txt_attn.k_proj.bias"):
        _model(sd)
    sd = original_state_dict()
    sd["double_blocks.0.extra_gate.weight"] = torch.zeros(3)
    with pytest.raises(OpenSoraConversionError, match=r"1 unexpected key\(s\): double_blocks.0.extra_gate.weight"):
        _model(sd)
    sd = original_state_dict()
    sd["single_blocks.0.linear2.weight"] = torch.zeros(HIDDEN, HIDDEN)
    with pytest.raises(OpenSoraConversionError, match="shape mismatch.*single_transformer_blocks.0.proj_out.weight"):
        _model(sd)


def test_other_layouts_are_named():
    sd = original_state_dict()
    sd["guidance_in.in_layer.weight"] = torch.zeros(HIDDEN, 256)
    with pytest.raises(OpenSoraConversionError, match="guidance embedding"):
        _model(sd)
    model = _model(original_state_dict())
    with pytest.raises(OpenSoraConversionError, match="already in diffusers layout"):
        _model(model.state_dict())


# ----------------------------------------------------------------------------------------- CLI and VAE
def _tiny_vae_config():
    return dict(in_channels=3, out_channels=3, latent_channels=C, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                norm_num_groups=4, mid_block_add_attention=True)


def test_cli_convert_opensora_then_from_pretrained(tmp_path, capsys):
    from diffusers import AutoencoderKLHunyuanVideo
    from safetensors.torch import save_file

    from diffusers_attn import OpenSoraPipeline
    from diffusers_attn.cli import main

    sd = original_state_dict(seed=5)
    src = tmp_path / "Open_Sora_v2.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "converted"
    assert main(["convert-opensora", str(src), str(out), "--axes-dims-rope", *map(str, AXES)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "not included" in printed and "vae" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_attn.pipelines.opensora.transformer", "OpenSoraTransformer3DModel"] and index["vae"] == [None, None]
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**_tiny_vae_config())
    pipe = OpenSoraPipeline.from_pretrained(str(out), vae=vae)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.time_shift_type == "linear"
    inputs = _inputs(seed=6, B=1, T=2, H=4, W=4)
    assert rel_err(_run(pipe.transformer, inputs), _ref(sd, inputs)) <= 1e-5
    # a wrong file is one readable error line, exit code 2, and nothing is written
    assert main(["convert-opensora", str(tmp_path / "missing.safetensors"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_hunyuan_vae_strict_load(tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo
    from safetensors.torch import save_file

    from diffusers_attn.pipelines.opensora import convert_hunyuan_vae

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**_tiny_vae_config())
    path = tmp_path / "hunyuan_vae.safetensors"
    save_file(vae.state_dict(), str(path))
    loaded = convert_hunyuan_vae(path, tmp_path / "vae", vae_config=_tiny_vae_config())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    assert (tmp_path / "vae" / "config.json").exists()
    sd = vae.state_dict()
    sd["encoder.extra.weight"] = torch.zeros(1)
    del sd["decoder.conv_out.conv.bias"]
    save_file(sd, str(path))
    with pytest.raises(OpenSoraConversionError, match="missing.*decoder.conv_out.conv.bias.*unexpected.*encoder.extra"):
        convert_hunyuan_vae(path, vae_config=_tiny_vae_config())


def test_bf16_conversion_within_bf16_tolerance():
    """The bf16 cast of the converted weights (the release dtype) stays within bf16 error of the fp64 reference."""
    sd = original_state_dict()
    # sigma with 1000*sigma exact in bf16: the model (like the original and Flux) forms 1000*sigma in its dtype,
    # and a rounded timestep would dominate the comparison.
    inputs = dict(_inputs(), timestep=torch.tensor([0.5, 0.25]))
    model = transformer_from_original(sd, torch_dtype=torch.bfloat16, config_overrides={"axes_dims_rope": AXES})
    assert model.dtype == torch.bfloat16
    bf = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    out = _run(model, bf).float()
    ref = _ref({k: v.to(torch.bfloat16) for k, v in sd.items()}, bf)
    assert rel_err(out, ref) <= 1e-2
