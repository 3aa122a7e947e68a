"""FEATTransformer3DModel: parameter counts, initialisation, layouts, the FEAT mixers, training, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_attn.kernels.biwkv import biwkv_reference
from diffusers_attn.pipelines.feat import FEAT_PRESETS, FEATTransformer3DModel, feat_parameter_count


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return FEATTransformer3DModel(hidden_size=32, num_heads=4, num_groups=2, **kw)


def randomize_zero_inits(m: torch.nn.Module, seed=1):
    """Give the zero-initialised (adaLN-Zero, RVG alpha, final) parameters random values, so paths are live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name,expected", [("FEAT-S", 158_100_624), ("FEAT-L", 629_201_112)])
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        m = FEATTransformer3DModel.from_preset(name)
    n = sum(p.numel() for p in m.parameters())
    assert n == expected == feat_parameter_count(**FEAT_PRESETS[name])
    assert len(m.blocks) == 18 and len(m.restormers) == 9
    names = dict(m.named_parameters())  # the official state-dict names
    for key in ("blocks.0.att.key.weight", "blocks.0.att.spatial_decay", "blocks.1.att.dwconv1d.weight",
                "blocks.0.att.alpha", "restormers.0.attn.temperature", "final_layer.linear.weight"):
        assert key in names
    assert names["blocks.0.att.spatial_decay"].shape[0] == 2 and names["blocks.1.att.spatial_decay"].shape[0] == 1
    with pytest.raises(ValueError, match="FEAT-S"):
        FEATTransformer3DModel.from_preset("FEAT-B")


def test_init_outputs_only_the_skip_and_rwkv_blocks_are_identity():
    m = tiny().eval()
    x = torch.randn(2, 4, 4, 8, 8)
    out = m(x, torch.tensor([3, 700])).sample
    assert out.shape == (2, 4, 8, 8, 8)
    skip = m.res_conv(x.flatten(0, 1)).view(2, 4, 8, 8, 8)
    assert torch.equal(out, skip)
    tok = torch.randn(8, 16, 32)
    c = torch.randn(8, 32)
    assert torch.equal(m.blocks[0](tok, tok, c, (4, 4), 2), tok)  # adaLN-Zero gates are 0


def test_spatial_mix_is_chained_row_then_column_scan():
    torch.manual_seed(0)
    m = tiny()
    att = m.blocks[0].att
    with torch.no_grad():
        att.alpha.normal_()
    n, h, w, D = 3, 4, 5, 32
    x, z = torch.randn(n, h * w, D), torch.randn(n, h * w, D)
    out = att(x, z, (h, w), 1)
    # by hand, with the O(T^2) oracle
    xs = att.dwconv2d(x.transpose(1, 2).reshape(n, D, h, w)).flatten(2).transpose(1, 2) + x
    k, v, r = att.key(xs), att.value(xs), att.receptance(xs)
    T = h * w
    dec = att.spatial_decay
    first = att.spatial_first
    o = biwkv_reference(k, v + att.alpha[0] * z, dec[0] / T, first[0] / T)
    kc = k.view(n, h, w, D).transpose(1, 2).reshape(n, T, D)
    oc = o.view(n, h, w, D).transpose(1, 2).reshape(n, T, D)
    o = biwkv_reference(kc, oc, dec[1] / T, first[1] / T).view(n, w, h, D).transpose(1, 2).reshape(n, T, D)
    o = o + att.alpha[1] * (z - v)
    expect = att.output(torch.sigmoid(r) * o)
    assert rel_err(out, expect) < 1e-5
    with torch.no_grad():  # alpha = 0: no RVG at all (z has no influence)
        att.alpha.zero_()
    assert torch.allclose(att(x, z, (h, w), 1), att(x, torch.randn_like(z), (h, w), 1))


def test_channel_attention_rows_sum_to_one():
    m = tiny()
    attn, v = m.restormers[0].attn.attention_map(torch.randn(2, 32, 4, 4))
    assert attn.shape == (2, 4, 8, 8)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 8), atol=1e-6)


def test_image_frames_skip_temporal_mixing():
    m = tiny()
    randomize_zero_inits(m)
    x = torch.randn(1, 5, 4, 8, 8)
    t = torch.tensor([100])
    out = m(x, t, use_image_num=2).sample
    with torch.no_grad():  # temporal-block parameters must not affect the 2 image frames
        for g in range(2):
            for p in m.blocks[2 * g + 1].parameters():
                p.add_(torch.randn_like(p))
    out2 = m(x, t, use_image_num=2).sample
    assert torch.equal(out[:, 3:], out2[:, 3:])
    assert not torch.allclose(out[:, :3], out2[:, :3])
    # each image frame is processed on its own: changing another frame leaves it unchanged
    x2 = x.clone()
    x2[:, 0] += 1
    assert torch.equal(m(x2, t, use_image_num=2).sample[:, 4], out2[:, 4])
    with pytest.raises(ValueError, match="use_image_num"):
        m(x, t, use_image_num=5)


def test_forward_backward_and_training_lowers_loss():
    from diffusers import DDPMScheduler

    m = tiny()
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    # a fixed toy batch: a bright square moving one latent pixel per frame
    x0 = torch.zeros(2, 4, 4, 8, 8)
    for f in range(4):
        x0[:, f, :, 2:5, f : f + 3] = 1.0
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([200, 600])
    xt = sched.add_noise(x0, noise, t)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        pred = m(xt, t).sample[:, :, :4]
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_save_and_from_pretrained(tmp_path):
    m = tiny(wkv_delta=1)
    randomize_zero_inits(m)
    m.save_pretrained(tmp_path / "feat")
    m2 = FEATTransformer3DModel.from_pretrained(tmp_path / "feat")
    assert m2.config.wkv_delta == 1 and m2.config.hidden_size == 32
    x = torch.randn(1, 3, 4, 8, 8)
    assert torch.equal(m(x, torch.tensor([5])).sample, m2(x, torch.tensor([5])).sample)


def test_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="B, F, C, H, W"):
        m(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 2, 4, 7, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="latent channels"):
        m(torch.randn(1, 2, 3, 8, 8), torch.tensor([1]))


def test_triton_wkv_backend_matches_cumsum():
    pytest.importorskip("triton")
    m = tiny()
    randomize_zero_inits(m)
    x = torch.randn(1, 3, 4, 4, 4)
    ref = m(x, torch.tensor([7])).sample
    for mod in m.modules():
        if hasattr(mod, "backend") and hasattr(mod, "recurrence"):
            mod.backend = "triton"
    assert rel_err(m(x, torch.tensor([7])).sample, ref) < 1e-5


def test_official_checkpoint_loader(tmp_path):
    """The official-layout loader on a synthetic checkpoint: wrapper, ``module.`` prefix, Restormer norm names."""
    src = tiny()
    randomize_zero_inits(src)
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace(".norm1.", ".norm1.body.") if k.startswith("restormers.") else k
        sd["module." + k] = v
    sd["module.y_embedder.embedding_table.weight"] = torch.zeros(2, 32)  # an extra official key
    torch.save({"ema": sd}, tmp_path / "feat.pt")
    m, rep = FEATTransformer3DModel.from_official_checkpoint(str(tmp_path / "feat.pt"), "FEAT-S", hidden_size=32,
                                                             num_heads=4, num_groups=2)
    assert rep == {"missing": [], "unexpected": ["y_embedder.embedding_table.weight"], "shape_mismatch": []}
    x = torch.randn(1, 2, 4, 8, 8)
    assert torch.equal(m(x, torch.tensor([3])).sample, src(x, torch.tensor([3])).sample)
    with pytest.raises(ValueError, match="does not match"):
        FEATTransformer3DModel.from_official_checkpoint(str(tmp_path / "feat.pt"), "FEAT-S", strict=True,
                                                        hidden_size=32, num_heads=4, num_groups=2)


class _RunInfo:
    """Stands for any class of the training run that the loading side does not have (or must not import)."""

    def __init__(self, note):
        self.note = note


_CALLED: list = []


def _record_call(value):
    _CALLED.append(value)
    return value


class _CallsOnLoad:
    """Unpickling this calls ``_record_call``: a stand-in for code a checkpoint could run when loaded unsafely."""

    def __reduce__(self):
        return (_record_call, ("ran",))


def test_official_training_checkpoint_with_args_loads_without_running_code(tmp_path):
    """The official train.py saves {"model", "ema", "opt", "args"}; "args" (and anything else that is not a
    tensor) must neither block the load nor execute: weights come from "ema", the rest stays inert."""
    import argparse

    src = tiny()
    randomize_zero_inits(src)
    ema = {"module." + k: v for k, v in src.state_dict().items()}
    opt = torch.optim.AdamW(src.parameters(), lr=1e-4)
    ckpt = {
        "model": {k: torch.zeros_like(v) for k, v in ema.items()},
        "ema": ema,
        "opt": opt.state_dict(),
        "args": argparse.Namespace(model="FEAT-S/2", num_frames=16, lr=1e-4),
        "run": _RunInfo("extra"),
        "hook": _CallsOnLoad(),
    }
    path = tmp_path / "0010000.pt"
    torch.save(ckpt, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)  # what the loader used to do
    _CALLED.clear()
    m, rep = FEATTransformer3DModel.from_official_checkpoint(str(path), "FEAT-S", hidden_size=32, num_heads=4,
                                                             num_groups=2, strict=True)
    assert _CALLED == [] and rep == {"missing": [], "unexpected": [], "shape_mismatch": []}
    x = torch.randn(1, 2, 4, 8, 8)
    assert torch.equal(m(x, torch.tensor([3])).sample, src(x, torch.tensor([3])).sample)  # ema, not "model"

    from diffusers_attn.pipelines._safe_load import UnknownObject, load_checkpoint_without_code

    raw = load_checkpoint_without_code(path)
    assert _CALLED == []
    for key in ("args", "run", "hook"):
        assert isinstance(raw[key], UnknownObject) and not isinstance(raw[key], (argparse.Namespace, _RunInfo))
    assert raw["args"]._pickled_name == "argparse.Namespace" and raw["args"]._state["num_frames"] == 16
    assert raw["hook"]._pickled_name.endswith("._record_call") and raw["hook"]._args == ("ran",)
    assert isinstance(raw["opt"]["param_groups"][0]["lr"], float)
    # a bare state dict with the args beside it also loads (non-tensor entries are skipped)
    torch.save({**ema, "args": argparse.Namespace(x=1)}, tmp_path / "bare.pt")
    _, rep = FEATTransformer3DModel.from_official_checkpoint(str(tmp_path / "bare.pt"), "FEAT-S", hidden_size=32,
                                                             num_heads=4, num_groups=2, strict=True)
    assert not any(rep.values())
