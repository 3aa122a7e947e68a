"""VAR models, checkpoint loading, sampler and pipeline (tiny random configs, CPU, offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from var_tiny import incremental_logits, random_teacher_inputs, tiny_pipe, tiny_vqvae

from diffusers_attn._env import env_var
from diffusers_attn.pipelines.var import (
    VQVAE,
    CheckpointMismatchError,
    VARPipeline,
    VARTransformer,
    phi_index_for_scale,
    sample_top_k_top_p,
    top_k_top_p_filter_,
)


def official_var_keys(depth: int, C: int, H: int, L: int, V: int, Cvae: int, SN: int, nc: int = 1000) -> dict:
    """Key -> shape of a released ``var_d*.pth``, written from the released checkpoints' layout, not from our
    model."""
    keys = {
        "word_embed.weight": (C, Cvae), "word_embed.bias": (C,), "class_emb.weight": (nc + 1, C),
        "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (SN, C), "lvl_1L": (1, L),
        "attn_bias_for_masking": (1, 1, L, L), "head_nm.ada_lin.1.weight": (2 * C, C),
        "head_nm.ada_lin.1.bias": (2 * C,), "head.weight": (V, C), "head.bias": (V,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "attn.scale_mul_1H11": (1, H, 1, 1), p + "attn.q_bias": (C,), p + "attn.v_bias": (C,),
            p + "attn.zero_k_bias": (C,), p + "attn.mat_qkv.weight": (3 * C, C), p + "attn.proj.weight": (C, C),
            p + "attn.proj.bias": (C,), p + "ffn.fc1.weight": (4 * C, C), p + "ffn.fc1.bias": (4 * C,),
            p + "ffn.fc2.weight": (C, 4 * C), p + "ffn.fc2.bias": (C,), p + "ada_lin.1.weight": (6 * C, C),
            p + "ada_lin.1.bias": (6 * C,),
        })
    return keys


def synthetic_official(keys: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("lvl_1L"):
            sd[k] = torch.zeros(shape, dtype=torch.long)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.02
    return sd


def tiny_official_vae_sd(vq: VQVAE) -> dict:
    sd = {k: v.clone() for k, v in vq.state_dict().items()}
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(len(vq.config.patch_nums), vq.config.vocab_size)
    return sd


# ---------------- phi / VQVAE ----------------

def test_phi_index_map_official_and_float64():
    assert [phi_index_for_scale(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    for SN in (3, 5, 7, 13):
        ticks = np.linspace(1 / 12, 1 - 1 / 12, 4)
        ref = [int(np.argmin(np.abs(ticks - si / (SN - 1)))) for si in range(SN)]
        assert [phi_index_for_scale(si, SN, 4) for si in range(SN)] == ref


def test_phi_is_half_residual_conv():
    vq = tiny_vqvae()
    conv = vq.quantize.quant_resi.qresi_ls[1]
    h = torch.randn(2, 8, 5, 5)
    ref = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(h), ref, rtol=1e-6, atol=1e-6)


def test_autoregressive_steps_reproduce_multiscale_encode():
    vq = tiny_vqvae(patch_nums=(1, 2, 3, 4, 6))
    img = torch.rand(2, 3, 12, 12) * 2 - 1
    f = vq.encode_to_f(img)
    assert f.shape == (2, 8, 6, 6)
    ids, f_hat_enc = vq.quantize.f_to_idx(f)
    assert [t.shape for t in ids] == [(2, pn * pn) for pn in (1, 2, 3, 4, 6)]
    teacher = vq.quantize.idx_to_var_input(ids)
    assert teacher.shape == (2, 4 + 9 + 16 + 36, 8)
    SN = 5
    f_hat = torch.zeros(2, 8, 6, 6)
    nxts = []
    for si, pn in enumerate(vq.config.patch_nums):
        h = vq.quantize.embedding(ids[si]).transpose(1, 2).reshape(2, 8, pn, pn)
        f_hat, nxt = vq.quantize.get_next_autoregressive_input(si, SN, f_hat, h)
        if si < SN - 1:
            nxts.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(f_hat, f_hat_enc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(nxts, 1), teacher, rtol=1e-5, atol=1e-5)
    out = vq.fhat_to_img(f_hat)
    assert out.shape == (2, 3, 12, 12) and out.abs().max() <= 1


# ---------------- released configurations (meta device: no memory) ----------------

@pytest.mark.parametrize("depth,params_m", [(16, 310.3), (20, 600.9), (24, 1033.4), (30, 2010.0), (36, 2353.9)])
def test_released_transformer_configs(depth, params_m):
    with torch.device("meta"):
        tr = VARTransformer.for_depth(depth)
    n = sum(p.numel() for p in tr.parameters())
    assert abs(n / 1e6 - params_m) < 0.1, n
    if depth != 36:
        C = 64 * depth
        ref = official_var_keys(depth, C, depth, 680, 4096, 32, 10)
        derived = {k for k in ref if k.rsplit(".", 1)[-1] in ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")}
        own = {k: tuple(v.shape) for k, v in tr.state_dict().items()}
        assert own == {k: v for k, v in ref.items() if k not in derived}
    else:
        sd = tr.state_dict()
        assert sd["blocks.0.ada_gss"].shape == (1, 1, 6, 2304) and sd["shared_ada_lin.1.weight"].shape == (6 * 2304, 2304)
        assert sd["pos_1LC"].shape == (1, 2240, 2304) and "blocks.0.ada_lin.1.weight" not in sd


def test_released_vqvae_config():
    with torch.device("meta"):
        vq = VQVAE()
    sd = vq.state_dict()
    assert len([k for k, _ in vq.named_parameters()]) == 323
    assert abs(sum(p.numel() for p in vq.parameters()) / 1e6 - 108.95) < 0.01
    expect = {
        "encoder.conv_out.weight": (32, 640, 3, 3), "decoder.conv_in.weight": (640, 32, 3, 3),
        "decoder.conv_out.weight": (3, 160, 3, 3), "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.weight": (32, 32, 3, 3), "quantize.embedding.weight": (4096, 32),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3), "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "decoder.up.4.attn.2.proj_out.weight": (640, 640, 1, 1), "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1), "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3), "encoder.mid.attn_1.qkv.weight": (1920, 640, 1, 1),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert "decoder.up.2.block.0.nin_shortcut.weight" not in sd


# ---------------- checkpoint loading ----------------

def _tiny_official_files(tmp_path, depth=2):
    vq = tiny_vqvae()
    keys = official_var_keys(depth, 128, 2, 14, 64, 8, 3)
    var_sd = synthetic_official(keys)
    torch.save(var_sd, tmp_path / "var.pth")
    torch.save(tiny_official_vae_sd(vq), tmp_path / "vae.pth")
    return vq, var_sd


TINY_CFG = dict(embed_dim=128, num_heads=2, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3))
TINY_VAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1)


def test_official_keys_load_strictly(tmp_path):
    vq, var_sd = _tiny_official_files(tmp_path)
    pipe = VARPipeline.from_var_checkpoint(tmp_path / "vae.pth", tmp_path / "var.pth", depth=2,
                                           transformer_config=TINY_CFG, vqvae_config=TINY_VAE)
    sd = pipe.transformer.state_dict()
    for k in ("blocks.1.attn.mat_qkv.weight", "pos_1LC", "head.bias", "blocks.0.attn.scale_mul_1H11"):
        assert torch.equal(sd[k], var_sd[k])
    assert torch.equal(pipe.vqvae.state_dict()["decoder.conv_out.weight"], vq.state_dict()["decoder.conv_out.weight"])
    # built on the meta device: the derived buffers are rebuilt and the model matches one built normally
    ref = VARTransformer(depth=2, **TINY_CFG)
    ref.load_state_dict({k: v for k, v in var_sd.items() if k.rsplit(".", 1)[-1] not in
                         ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")})
    tr = pipe.transformer
    assert not any(t.is_meta for t in list(tr.parameters()) + list(tr.buffers()))
    assert torch.equal(tr.attn_bias_for_masking, ref.attn_bias_for_masking) and torch.equal(tr.lvl_1L, ref.lvl_1L)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([1, 2])
    ids = [torch.randint(0, 64, (2, pn * pn)) for pn in (1, 2, 3)]
    teacher = pipe.vqvae.quantize.idx_to_var_input(ids)
    with torch.no_grad():
        assert torch.equal(tr(labels, teacher), ref(labels, teacher))
    img = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (2, 3, 6, 6) and torch.isfinite(img).all()


def test_torch_dtype_casts_without_the_diffusers_fp32_warning(tmp_path):
    import logging

    _tiny_official_files(tmp_path)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe = VARPipeline.from_var_checkpoint(tmp_path / "vae.pth", tmp_path / "var.pth", depth=2,
                                               torch_dtype=torch.bfloat16, transformer_config=TINY_CFG,
                                               vqvae_config=TINY_VAE)
        assert not [r for r in records if "kept in float32" in r]  # diffusers 0.42 warned once per model
        # the handler does see diffusers' model logger (so the check above can fail)
        logging.getLogger("diffusers.models.modeling_utils").warning("probe kept in float32")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert records[-1] == "probe kept in float32"
    assert {p.dtype for p in pipe.vqvae.parameters()} == {torch.bfloat16}


def test_autocast_dtype_runs_the_official_mixed_precision():
    """fp32 weights under autocast (the official demo's recipe): matmuls run in the autocast dtype, the result is
    the sampler run inside ``torch.autocast``, and bf16-cast weights are refused for it."""
    pipe = tiny_pipe()
    kw = dict(top_k=30, top_p=0.95, output_type="pt", return_token_ids=True)
    seen = []
    hook = pipe.transformer.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        amp = pipe([1, 2], generator=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16, **kw)
        assert set(seen) == {torch.bfloat16}
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            manual = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw)
        seen.clear()
        fp32 = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw)
        assert set(seen) == {torch.float32}
    finally:
        hook.remove()
    assert all(torch.equal(x, y) for x, y in zip(amp.token_ids, manual.token_ids))
    assert torch.equal(amp.images, manual.images) and amp.images.dtype == torch.float32
    assert not torch.equal(amp.images, fp32.images)
    with pytest.raises(ValueError, match="needs fp32 weights"):
        tiny_pipe().to(torch.bfloat16)([1], autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        pipe([1], autocast_dtype=torch.float64)


def test_corrupted_checkpoint_errors_clearly(tmp_path):
    _, var_sd = _tiny_official_files(tmp_path)
    bad = dict(var_sd)
    del bad["blocks.1.ffn.fc2.bias"]
    bad["blocks.1.ffn.fc3.weight"] = torch.zeros(3)
    bad["head.weight"] = torch.zeros(65, 128)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        VARPipeline.from_var_checkpoint(tmp_path / "vae.pth", tmp_path / "bad.pth", depth=2,
                                        transformer_config=TINY_CFG, vqvae_config=TINY_VAE)
    msg = str(e.value)
    assert "missing keys (1): blocks.1.ffn.fc2.bias" in msg
    assert "unexpected keys (1): blocks.1.ffn.fc3.weight" in msg
    assert "head.weight: checkpoint (65, 128) vs model (64, 128)" in msg
    # wrong depth: every block-3 key is missing
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        VARPipeline.from_var_checkpoint(tmp_path / "vae.pth", tmp_path / "var.pth", depth=3,
                                        transformer_config=TINY_CFG, vqvae_config=TINY_VAE)
    with pytest.raises(ValueError, match="released VAR checkpoints have depth"):
        VARPipeline.from_var_checkpoint(tmp_path / "vae.pth", tmp_path / "var.pth", depth=17)


def test_save_pretrained_round_trip(tmp_path):
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path / "p")
    pipe2 = VARPipeline.from_pretrained(tmp_path / "p")
    pipe2.set_progress_bar_config(disable=True)
    for a, b in ((pipe.transformer, pipe2.transformer), (pipe.vqvae, pipe2.vqvae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    kw = dict(top_k=20, top_p=0.9, output_type="pt")
    x1 = pipe([3, 7], generator=torch.Generator().manual_seed(1), **kw).images
    x2 = pipe2([3, 7], generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(x1, x2)


# ---------------- KV cache vs teacher forcing ----------------

@pytest.mark.parametrize("shared_aln", [False, True])
def test_kv_cache_matches_teacher_forced(shared_aln):
    pipe = tiny_pipe(patch_nums=(1, 2, 3, 4, 6), shared_aln=shared_aln)
    tr = pipe.transformer
    labels = torch.tensor([3, 11, 1000])
    _, teacher = random_teacher_inputs(pipe, 3)
    with torch.no_grad():
        full = tr(labels, teacher)
    inc = incremental_logits(tr, labels, teacher)
    assert full.shape == (3, tr.L, 64)
    for si, (bg, ed) in enumerate(tr.begin_ends):
        torch.testing.assert_close(inc[si], full[:, bg:ed], rtol=1e-5, atol=1e-5)
    # the mask matters: without the block-causal bias the teacher-forced logits differ
    with torch.no_grad():
        cond = tr.class_cond(labels)
        x = torch.cat((tr.first_input(cond), tr.word_embed(teacher) + tr.lvl_pos()[:, 1:]), 1)
        nomask = tr.get_logits(tr.run_blocks(x, cond, None, scale_idx=None, cfg_batch=False), cond)
    assert (nomask[:, :5] - full[:, :5]).abs().max() > 1e-3


# ---------------- sampler ----------------

def test_top_k_keeps_ties_and_drops_strictly_below():
    logits = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 0.0]]])
    out = top_k_top_p_filter_(logits.clone(), top_k=2)
    assert torch.isinf(out).tolist() == [[[False, True, False, False, True]]]
    out = top_k_top_p_filter_(logits.clone(), top_k=4)
    assert torch.isinf(out).tolist() == [[[False, False, False, False, True]]]


def test_top_p_semantics():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 1, 4)
    out = top_k_top_p_filter_(logits.clone(), top_p=0.7)  # ascending cum: .05 .2 .5 1 -> drop cum <= .3
    assert torch.isinf(out).tolist() == [[[False, False, True, True]]]
    out = top_k_top_p_filter_(logits.clone(), top_p=0.01)  # everything but the max
    assert torch.isinf(out).tolist() == [[[False, True, True, True]]]
    out = top_k_top_p_filter_(logits.clone(), top_p=0.0)  # off
    assert not torch.isinf(out).any()
    # sampling only ever returns kept tokens
    ids = sample_top_k_top_p(logits.expand(1, 500, 4).clone(), top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(ids.unique().tolist()) == {0, 1}


def test_sampler_determinism_and_rng_order():
    pipe = tiny_pipe()
    kw = dict(top_k=30, top_p=0.95, output_type="pt", return_token_ids=True)
    a = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw)
    b = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw)
    c = pipe([1, 2], generator=torch.Generator().manual_seed(5), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.token_ids, b.token_ids)) and torch.equal(a.images, b.images)
    assert any(not torch.equal(x, y) for x, y in zip(a.token_ids, c.token_ids))
    # labels drawn from the generator first, then the sampling draws
    g = torch.Generator().manual_seed(3)
    drawn = pipe(None, batch_size=2, generator=g, **kw)
    g2 = torch.Generator().manual_seed(3)
    labels = torch.multinomial(torch.full((1000,), 1e-3), 2, replacement=True, generator=g2)
    manual = pipe(labels, generator=g2, **kw)
    assert all(torch.equal(x, y) for x, y in zip(drawn.token_ids, manual.token_ids))
    # more_smooth: scale 0's multinomial comes before the first exponential draw, then the streams diverge
    sm = pipe([1, 2], generator=torch.Generator().manual_seed(0), more_smooth=True, **kw)
    assert torch.equal(sm.token_ids[0], a.token_ids[0])
    assert not torch.equal(sm.images, a.images)


def test_cfg_ramp_zero_at_first_scale_and_cond_first():
    pipe = tiny_pipe()
    kw = dict(top_k=0, top_p=0.0, output_type="pt", return_token_ids=True)
    a = pipe([4, 9], guidance_scale=0.0, generator=torch.Generator().manual_seed(0), **kw)
    b = pipe([4, 9], guidance_scale=50.0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.token_ids[0], b.token_ids[0])  # t = cfg * 0 at scale 0
    assert any(not torch.equal(x, y) for x, y in zip(a.token_ids[1:], b.token_ids[1:]))
    # guidance 0 uses only the first (conditional) half: the scale-0 logits equal the model's cond logits
    tr = pipe.transformer
    seen = {}
    orig = tr.get_logits

    def spy(x, cond):
        out = orig(x, cond)
        seen.setdefault("first", out)
        return out

    tr.get_logits = spy
    try:
        pipe([4, 9], guidance_scale=0.0, generator=torch.Generator().manual_seed(0), **kw)
    finally:
        del tr.get_logits
    with torch.no_grad():
        cond = tr.class_cond(torch.tensor([4, 9]))
        ref = tr.get_logits(tr.run_blocks(tr.first_input(cond), cond, None, scale_idx=0, cfg_batch=False), cond)
    torch.testing.assert_close(seen["first"][:2], ref, rtol=1e-5, atol=1e-5)
    null = tr.class_cond(torch.tensor([1000]))
    ref_u = tr.get_logits(tr.run_blocks(tr.first_input(null), null, None, scale_idx=0, cfg_batch=False), null)
    torch.testing.assert_close(seen["first"][2:], ref_u.expand(2, -1, -1), rtol=1e-5, atol=1e-5)


def test_pipeline_outputs_and_errors():
    pipe = tiny_pipe()
    g = torch.Generator().manual_seed(0)
    pt = pipe([1, 2, -1], generator=g, output_type="pt").images
    assert pt.shape == (3, 3, 6, 6) and pt.min() >= 0 and pt.max() <= 1 and not torch.isnan(pt).any()
    npy = pipe([1, 2, -1], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert npy.shape == (3, 6, 6, 3)
    np.testing.assert_allclose(npy, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe(5, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (6, 6)
    with pytest.raises(ValueError, match="class labels must be < 1000"):
        pipe([1000])
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="jpg")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs(dtype):
    pipe = tiny_pipe().to(dtype)
    out = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 6, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize("shared_aln,litevar", [(False, False), (True, False), (False, True)])
def test_pipeline_sampling_matches_teacher_forced_on_its_own_tokens(shared_aln, litevar):
    """The sampler's per-scale logits (both CFG halves) equal one teacher-forced forward fed its sampled tokens
    (dense, and with LiteVAR masks installed)."""
    pipe = tiny_pipe(patch_nums=(1, 2, 3, 4, 6), shared_aln=shared_aln)
    tr = pipe.transformer
    if litevar:
        from diffusers_attn import LiteVARConfig, LiteVARMaskSet, apply_litevar
        from diffusers_attn.methods.litevar import default_maskable

        lay = default_maskable((1, 2, 3, 4, 6))
        widths = {k: torch.tensor([2, 3, 1][: len(segs)]).expand(2, 2, -1).clone() for k, segs in lay.items()}
        apply_litevar(pipe, LiteVARConfig(masks=LiteVARMaskSet((1, 2, 3, 4, 6), 2, 2, widths, lay)))
    seen = []
    orig = tr.get_logits
    tr.get_logits = lambda x, cond: seen.append(orig(x, cond)) or seen[-1]
    try:
        out = pipe([5, 17], guidance_scale=3.0, top_k=30, top_p=0.9, generator=torch.Generator().manual_seed(2),
                   output_type="latent", return_token_ids=True)
    finally:
        del tr.get_logits
    teacher = pipe.vqvae.quantize.idx_to_var_input(out.token_ids)
    with torch.no_grad():
        cond = tr(torch.tensor([5, 17]), teacher)
        uncond = tr(torch.tensor([1000, 1000]), teacher)
    for si, (bg, ed) in enumerate(tr.begin_ends):
        torch.testing.assert_close(seen[si][:2], cond[:, bg:ed], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[si][2:], uncond[:, bg:ed], rtol=1e-5, atol=1e-5)
    # and the returned f_hat is the multi-scale sum of its tokens
    SN = len(tr.patch_nums)
    f_hat = torch.zeros(2, 8, 6, 6)
    for si, pn in enumerate(tr.patch_nums):
        h = pipe.vqvae.quantize.embedding(out.token_ids[si]).transpose(1, 2).reshape(2, 8, pn, pn)
        f_hat, _ = pipe.vqvae.quantize.get_next_autoregressive_input(si, SN, f_hat, h)
    torch.testing.assert_close(out.images, f_hat, rtol=1e-5, atol=1e-5)


REAL_DIR = env_var("VAR_CHECKPOINTS")


@pytest.mark.skipif(not REAL_DIR, reason="set DIFFATTN_VAR_CHECKPOINTS to a folder with the released .pth files")
def test_real_checkpoints_load_strictly():
    """With the released files present (vae_ch160v4096z32.pth, var_d16.pth, ...): strict load + a short forward."""
    depths = [d for d in (16, 20, 24, 30) if os.path.exists(os.path.join(REAL_DIR, f"var_d{d}.pth"))]
    if not depths:
        pytest.skip("no var_d*.pth in DIFFATTN_VAR_CHECKPOINTS")
    d = depths[0]
    pipe = VARPipeline.from_var_checkpoint(os.path.join(REAL_DIR, "vae_ch160v4096z32.pth"),
                                           os.path.join(REAL_DIR, f"var_d{d}.pth"), depth=d)
    tr = pipe.transformer
    ids = [torch.randint(0, 4096, (1, pn * pn)) for pn in tr.patch_nums[:3]]
    f = torch.zeros(1, 32, 16, 16)
    nxt = []
    for si, pn in enumerate(tr.patch_nums[:2]):
        h = pipe.vqvae.quantize.embedding(ids[si]).transpose(1, 2).reshape(1, 32, pn, pn)
        f, x = pipe.vqvae.quantize.get_next_autoregressive_input(si, 10, f, h)
        nxt.append(x.flatten(2).transpose(1, 2))
    with torch.no_grad():
        logits = tr(torch.tensor([207]), torch.cat(nxt, 1))
    assert logits.shape == (1, 14, 4096) and torch.isfinite(logits).all()
