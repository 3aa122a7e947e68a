"""LiteVAR on the tiny VAR: masks, calibration, CFG attention sharing, quantization, stats (CPU, offline)."""

from __future__ import annotations

import pytest
import torch
from var_tiny import incremental_logits, random_teacher_inputs, tiny_pipe

from diffusers_attn import get_attention_stats
from diffusers_attn.api.litevar import apply_litevar, calibrate_litevar, remove_litevar
from diffusers_attn.methods.litevar import (
    LiteVARConfig,
    LiteVARMaskSet,
    band_mask,
    choose_widths,
    default_maskable,
    segment_statistics,
)
from diffusers_attn.methods.litevar.calibration import Recorder as _Recorder
from diffusers_attn.methods.litevar.method import _attend
from diffusers_attn.methods.litevar.quant import FakeQuantLinear, fake_quant, fake_quant_probs, int8_linear, int8_weight

PN = (1, 2, 3, 4, 6)


def random_masks(seed: int = 0, depth: int = 2, heads: int = 2) -> LiteVARMaskSet:
    """Widths mixing DROP (0), bands and FULL (>= n_seg) on the T2 layout."""
    g = torch.Generator().manual_seed(seed)
    lay = default_maskable(PN)
    widths = {k: torch.stack([torch.randint(0, PN[s] ** 2 + 2, (depth, heads), generator=g) for s in segs], -1)
              for k, segs in lay.items()}
    return LiteVARMaskSet(PN, depth, heads, widths, lay)


def test_default_layout_matches_litevar():
    lay = default_maskable((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert lay[3] == (3, 2) and lay[4] == (4, 3, 2) and lay[5] == (5, 4, 3) and lay[9] == (9, 8, 7, 6, 5, 4, 3)
    assert sum(len(v) for v in lay.values()) == 30 and 0 not in lay


def test_litevar_candidate_lists_fit_the_layout():
    from diffusers_attn.methods.litevar import LITEVAR_CANDIDATE_WIDTHS

    lay = default_maskable((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    for heads in (16, 30):
        table = LITEVAR_CANDIDATE_WIDTHS[heads]
        assert sorted(table) == sorted(lay)
        for k, segs in lay.items():
            assert len(table[k]) == len(segs) and all(all(c > 0 for c in lst) for lst in table[k])
    # per-segment candidate lists are honoured
    n = 16
    p = torch.zeros(1, 1, n, 30, dtype=torch.float64)
    p[..., 14:30] = torch.eye(n, dtype=torch.float64)
    hist, seg_mass, total = segment_statistics(p, 3, (3, 2), PN)
    w = choose_widths(hist, seg_mass, total, 3, (3, 2), PN, 0.95, None, False, [[2, 5], [3]])
    assert w[0].tolist() == [2, 3]
    pipe = tiny_pipe(PN)
    with pytest.raises(ValueError, match="candidate_widths='litevar' exists only"):
        calibrate_litevar(pipe, [1], drop_table=None, candidate_widths="litevar")


def test_band_materialisation_matches_formula():
    m = random_masks(3)
    ends = [1, 5, 14, 30, 66]
    for k, segs in m.maskable.items():
        n_q = PN[k] ** 2
        for b in range(2):
            full = m.scale_mask(k, b)
            ref = torch.ones(2, n_q, ends[k], dtype=torch.bool)
            for si, s in enumerate(segs):
                n_seg = PN[s] ** 2
                for h in range(2):
                    w = int(m.widths[k][b, h, si])
                    for i in range(n_q):
                        for j in range(n_seg):
                            ref[h, i, ends[s] - n_seg + j] = abs(i * n_seg / n_q - j) < w
            if full is None:
                assert ref.all()
            else:
                assert torch.equal(full, ref)
    assert not band_mask(9, 4, 0).any() and band_mask(9, 4, 4).all() and band_mask(16, 16, 20).all()
    # current segment: |i - j| < w
    assert torch.equal(band_mask(5, 5, 2), (torch.arange(5)[:, None] - torch.arange(5)).abs() < 2)


def test_mask_set_validation():
    lay = default_maskable(PN)
    ok = {k: torch.ones(2, 2, len(v), dtype=torch.int16) for k, v in lay.items()}
    with pytest.raises(ValueError, match="scale 0 keys"):
        LiteVARMaskSet(PN, 2, 2, {3: torch.ones(2, 2, 2)}, {3: (3, 0)})
    with pytest.raises(ValueError, match="expected"):
        LiteVARMaskSet(PN, 2, 2, {**ok, 3: torch.ones(2, 2, 5)}, lay)
    with pytest.raises(ValueError, match="negative"):
        LiteVARMaskSet(PN, 2, 2, {**ok, 4: -torch.ones(2, 2, 3)}, lay)
    with pytest.raises(ValueError, match="mask_mode"):
        LiteVARConfig(mask_mode="sparse")
    # every query keeps its scale-0 key even when every maskable segment is dropped
    dropped = LiteVARMaskSet(PN, 2, 2, {k: torch.zeros(2, 2, len(v)) for k, v in lay.items()}, lay)
    for k in lay:
        m = dropped.scale_mask(k, 0)
        assert m[:, :, 0].all() and m.any(-1).all()


def test_mask_modes_row_sums():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 30, 8)
    eye = torch.eye(30).expand(1, 2, 30, 30)
    mask = random_masks(1).scale_mask(3, 0)
    assert mask is not None and not mask.all()
    p_ren = _attend(q, k, eye, 1.0, mask, None, "renormalized", None, False)
    p_q = _attend(q, k, eye, 1.0, mask, None, "litevar_quant", None, False)
    p_f = _attend(q, k, eye, 1.0, mask, None, "litevar_float", None, False)
    torch.testing.assert_close(p_ren.sum(-1), torch.ones(1, 2, 16))
    assert (p_ren[0][~mask] == 0).all() and (p_q[0][~mask] == 0).all()
    assert (p_q.sum(-1) <= 1 + 1e-6).all() and (p_q.sum(-1) < 1 - 1e-4).any()
    assert (p_f[0][~mask] > 0).all()  # logits x 0 is not masking (release parity only)
    torch.testing.assert_close(p_f.sum(-1), torch.ones(1, 2, 16))


def test_noop_litevar_reproduces_baseline_exactly():
    pipe = tiny_pipe(PN)
    tr = pipe.transformer
    labels = torch.tensor([5, 6])
    _, teacher = random_teacher_inputs(pipe, 2)
    kw = dict(top_k=20, top_p=0.9, output_type="pt", return_token_ids=True)
    base = pipe([5, 6], generator=torch.Generator().manual_seed(0), **kw)
    base_inc = incremental_logits(tr, labels, teacher)
    with torch.no_grad():
        base_tf = tr(labels, teacher)
    apply_litevar(pipe, LiteVARConfig(masks=LiteVARMaskSet.full(PN, 2, 2)))
    out = pipe([5, 6], generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out.images, base.images)
    assert all(torch.equal(a, b) for a, b in zip(base_inc, incremental_logits(tr, labels, teacher)))
    with torch.no_grad():
        assert torch.equal(tr(labels, teacher), base_tf)
    assert remove_litevar(pipe) and not remove_litevar(pipe)


@pytest.mark.parametrize("mode", ["renormalized", "litevar_quant", "litevar_float"])
def test_kv_cache_matches_teacher_forced_with_masks(mode):
    pipe = tiny_pipe(PN)
    tr = pipe.transformer
    labels = torch.tensor([3, 1000])
    _, teacher = random_teacher_inputs(pipe, 2, seed=4)
    inc0 = incremental_logits(tr, labels, teacher)
    apply_litevar(pipe, LiteVARConfig(masks=random_masks(2), mask_mode=mode))
    with torch.no_grad():
        full = tr(labels, teacher)
    inc = incremental_logits(tr, labels, teacher)
    for si, (bg, ed) in enumerate(tr.begin_ends):
        torch.testing.assert_close(inc[si], full[:, bg:ed], rtol=1e-5, atol=1e-5)
    assert (inc[4] - inc0[4]).abs().max() > 1e-3  # the masks did change the maskable scales
    torch.testing.assert_close(inc[2], inc0[2], rtol=1e-5, atol=1e-5)  # unmaskable scales untouched


def test_calibration_recovers_planted_band():
    n = 16
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None]
    band = ((i - j).abs() < 3).double()
    p_seg = band / band.sum(-1, keepdim=True)
    p = torch.zeros(1, 1, n, 30, dtype=torch.float64)
    p[..., 14:30] = 0.9 * p_seg
    p[..., 0] = 0.1  # sink
    hist, seg_mass, total = segment_statistics(p, 3, (3, 2), PN)
    w = choose_widths(hist, seg_mass, total, 3, (3, 2), PN, 0.95, None, False, None)
    assert w[0, 0] == 3 and w[0, 1] == 1  # empty previous segment: zero mass, narrowest band
    w = choose_widths(hist, seg_mass, total, 3, (3, 2), PN, 0.95, (0.05, 0.05), False, None)
    assert w[0, 0] == 3 and w[0, 1] == 0  # and DROPped under a drop table
    w = choose_widths(hist, seg_mass, total, 3, (3, 2), PN, 0.95, None, False, [1, 2])
    assert w[0, 0] == 16  # no candidate reaches the threshold -> FULL


def test_calibrated_masks_keep_threshold_mass_and_roundtrip(tmp_path):
    pipe = tiny_pipe(PN)
    tr = pipe.transformer
    labels = [1, 2, 3, 4]
    thr = 0.9
    masks = calibrate_litevar(pipe, labels, threshold=thr, drop_table=None, batch_size=2, top_k=20, top_p=0.9)
    kinds = torch.cat([masks.seg_kind(k).flatten() for k in masks.widths])
    assert (kinds == 1).any()  # some bands were found
    # recompute the maps per calibration batch with a fresh recorder and check every kept segment's band mass
    from diffusers_attn.adapters.var import VARProbeAttnProcessor

    for start in (0, 2):
        rec = _Recorder(PN, masks.maskable, prob_floor=0.003)
        orig = dict(tr.attn_processors)
        tr.set_attn_processor({k: VARProbeAttnProcessor(int(k.split(".")[1]), rec.maskable, rec.add) for k in orig})
        pipe(labels[start : start + 2], top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0), output_type="latent")
        tr.set_attn_processor(orig)
        for (k, b), (hist, seg_mass, _) in rec.data.items():
            for h in range(2):
                for si, s in enumerate(masks.maskable[k]):
                    w = int(masks.widths[k][b, h, si])
                    kept = float(hist[h, si, : w + 1].sum())
                    assert kept >= thr * float(seg_mass[h, si]) - 1e-9
    # union merge is monotone
    other = random_masks(5)
    u = masks.union(other)
    for k in u.widths:
        assert (u.widths[k] >= masks.widths[k]).all() and (u.widths[k] >= other.widths[k]).all()
        for b in range(2):
            mu, mm = u.scale_mask(k, b), masks.scale_mask(k, b)
            if mu is not None:
                assert (mu | ~mm).all()
    # safetensors round trip (and config loading from a path)
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    back = LiteVARMaskSet.load(path)
    assert back == masks and back.metadata["threshold"] == thr and back.metadata["merge"] == "union"
    assert LiteVARConfig(masks=str(path)).masks == masks
    with pytest.raises(ValueError, match="drop_table='litevar' is defined for patch_nums"):
        calibrate_litevar(pipe, [1], drop_table="litevar")
    wrong = LiteVARMaskSet.full((1, 2, 3, 4, 5), 2, 2)
    with pytest.raises(ValueError, match="mask set is for patch_nums"):
        apply_litevar(pipe, LiteVARConfig(masks=wrong))


def test_cfg_sharing_identical_halves_reproduces_baseline():
    pipe = tiny_pipe(PN)
    tr = pipe.transformer
    labels = torch.tensor([7, 8, 7, 8])
    _, teacher = random_teacher_inputs(pipe, 2, seed=1)
    teacher = teacher.repeat(2, 1, 1)
    base = incremental_logits(tr, labels, teacher, cfg_batch=True)
    apply_litevar(pipe, LiteVARConfig(share_cfg_attention=True))
    shared = incremental_logits(tr, labels, teacher, cfg_batch=True)
    for a, b in zip(base, shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # with different halves the outputs change, and only where sharing is enabled
    lab2 = torch.tensor([7, 8, 1000, 1000])
    remove_litevar(pipe)
    base2 = incremental_logits(tr, lab2, teacher, cfg_batch=True)
    apply_litevar(pipe, LiteVARConfig(share_cfg_attention=True, share_cfg_scales=[4]))
    sh2 = incremental_logits(tr, lab2, teacher, cfg_batch=True)
    for si in range(4):
        assert torch.equal(sh2[si], base2[si])
    assert (sh2[4][2:] - base2[4][2:]).abs().max() > 1e-4
    torch.testing.assert_close(sh2[4][:2], base2[4][:2], rtol=1e-5, atol=1e-5)  # cond half unchanged


def test_cfg_sharing_applies_cond_map_to_uncond_values():
    pipe = tiny_pipe(PN)
    attn = pipe.transformer.blocks[1].attn
    apply_litevar(pipe, LiteVARConfig(share_cfg_attention=True))
    torch.manual_seed(0)
    x = torch.randn(4, 9, 128)
    with torch.no_grad():
        out = attn(x, None, scale_idx=2, cfg_batch=True)
        q, k, v = attn.processor._base.qkv(attn, x)
        p = (q[:2] @ k[:2].transpose(-1, -2) * attn.scale).softmax(-1)
        ref = attn.processor._base.out(attn, torch.cat((p @ v[:2], p @ v[2:])))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fake_quant_arithmetic_and_axes():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.equal(fake_quant(x, 2, -1), x)  # divisor 2^b - 1: scale 1, exact
    torch.testing.assert_close(fake_quant(x, 2, -1, parity_divisor=True), torch.tensor([[0.0, 0.75, 2.25, 2.25]]))
    y = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])  # zp = min / scale, unrounded
    assert torch.equal(fake_quant(y, 2, -1), y)
    torch.manual_seed(0)
    t = torch.randn(5, 7) * torch.arange(1, 6)[:, None]
    per_tok = fake_quant(t, 4, -1)
    assert all(torch.equal(per_tok[i], fake_quant(t[i : i + 1], 4, -1)[0]) for i in range(5))
    per_ch = fake_quant(t, 4, 0)
    assert all(torch.equal(per_ch[:, c], fake_quant(t[:, c : c + 1], 4, 0)[:, 0]) for c in range(7))
    assert torch.equal(fake_quant_probs(torch.tensor([0.25, 1.0, 0.0]), 8), torch.tensor([64 / 255, 1.0, 0.0]))
    assert fake_quant_probs(torch.tensor([1.0]), 8, parity_divisor=True).item() == 255 / 256


def test_fake_quant_error_falls_with_bits_and_fc2_excluded():
    pipe = tiny_pipe(PN)
    tr = pipe.transformer
    labels = torch.tensor([3, 9])
    _, teacher = random_teacher_inputs(pipe, 2, seed=2)
    with torch.no_grad():
        ref = tr(labels, teacher)
    errs = {}
    for preset in ("w4a4", "w4a6", "w6a6", "w8a8"):
        ctx = apply_litevar(pipe, LiteVARConfig(quant=preset))
        assert type(tr.blocks[0].ffn.fc2) is torch.nn.Linear and type(tr.blocks[0].ffn.fc1) is FakeQuantLinear
        info = ctx.stats.info
        assert "blocks.0.ffn.fc2" in info["kept_16bit_layers"] and "head" in info["quantized_layers"]
        with torch.no_grad():
            out = tr(labels, teacher)
        assert torch.isfinite(out).all()
        errs[preset] = float((out - ref).norm() / ref.norm())
        remove_litevar(pipe)
    assert errs["w4a4"] > errs["w4a6"] > errs["w6a6"] > errs["w8a8"], errs
    assert errs["w8a8"] < 0.05, errs
    assert type(tr.blocks[0].ffn.fc1) is torch.nn.Linear  # un-wrapped
    with torch.no_grad():
        assert torch.equal(tr(labels, teacher), ref)


def test_int8_path_cpu_error_and_math():
    pipe = tiny_pipe()
    with pytest.raises(RuntimeError, match="needs the model on CUDA"):
        apply_litevar(pipe, LiteVARConfig(quant="int8"))
    assert type(pipe.transformer.blocks[0].ffn.fc1) is torch.nn.Linear  # nothing installed
    torch.manual_seed(0)
    w, x, b = torch.randn(64, 128), torch.randn(3, 5, 128), torch.randn(64)
    wq, ws = int8_weight(w)
    out = int8_linear(x, wq, ws, b)  # torch._int_mm also runs on CPU, so the math is testable here
    ref = x @ w.T + b
    assert out.shape == ref.shape and float((out - ref).norm() / ref.norm()) < 2e-2
    with pytest.raises(ValueError, match="quant 'int4'"):
        LiteVARConfig(quant="int4")
    # the whole int8 conversion on the tiny model (kernel through torch._int_mm on CPU): logits stay close
    from diffusers_attn.methods.litevar.quant import Int8Linear, quantizable_linears, to_int8_linear

    pipe = tiny_pipe(PN)
    tr = pipe.transformer
    labels = torch.tensor([3, 9])
    _, teacher = random_teacher_inputs(pipe, 2, seed=2)
    with torch.no_grad():
        ref = tr(labels, teacher)
    chosen, kept = quantizable_linears(tr, ("ffn.fc2",))
    for _, mod in chosen:
        to_int8_linear(mod)
    assert type(tr.blocks[0].attn.mat_qkv) is Int8Linear and "blocks.0.ffn.fc2" in kept
    assert not hasattr(tr.blocks[0].attn.mat_qkv, "weight") or tr.blocks[0].attn.mat_qkv.weight is None
    with torch.no_grad():
        out = tr(labels, teacher)
    assert float((out - ref).norm() / ref.norm()) < 0.05
    f_hat = pipe([1, 2], top_k=20, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert f_hat.shape == (2, 8, 6, 6) and torch.isfinite(f_hat).all()  # the sampler runs on int8 linears


def test_stats_report_kept_share_and_quantized_layers():
    pipe = tiny_pipe(PN)
    masks = random_masks(7)
    apply_litevar(pipe, LiteVARConfig(masks=masks, share_cfg_attention=True, quant="w8a8"))
    pipe([1, 2], top_k=20, generator=torch.Generator().manual_seed(0), output_type="latent")
    st = get_attention_stats(pipe, log=False)
    kept = st.info["kept_attention_share_per_scale"]
    assert kept[0] == 1.0 and abs(kept[4] - masks.kept_share(4)) < 1e-5 and kept[4] < 1
    assert abs(st.info["computed_score_share_per_scale"][4] - kept[4] / 2) < 1e-5
    assert st.method == "litevar" and st.calls == 2 * 5 and st.kernel_backends["masked_sdpa"] >= 1
    assert "blocks.1.attn.mat_qkv" in st.info["quantized_layers"]
    pipe([1, 2], top_k=20, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert get_attention_stats(pipe, log=False).calls == 10  # reset per generation
