"""RainFusion 2.0 (mode="rf2"): exactness vs the executed block lists, budget accounting, planted structure, reuse,
the dense fallback, autograd, and the tiny real transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, rel_err

import diffusers_attn.methods.rainfusion.rf2 as rf2
from diffusers_attn import apply_rainfusion, get_attention_stats
from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.kernels import lists_to_block_mask, lists_to_token_mask, masked_attention_reference
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.base import CallInfo
from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod
from diffusers_attn.testing import planted_qkv

SPARSE = dict(mode="rf2", dense_steps=0, dense_layers=0, min_video_tokens=0)


@pytest.fixture
def spy(monkeypatch):
    """The block lists every rf2 kernel call executed, in call order."""
    calls = []
    kernel = rf2.block_sparse_attention

    def wrapped(q, k, v, idx, cnt, **kw):
        calls.append((idx.clone(), cnt.clone()))
        return kernel(q, k, v, idx, cnt, **kw)

    monkeypatch.setattr(rf2, "block_sparse_attention", wrapped)
    return calls


def _ctx():
    class _A:  # the method never touches the adapter
        pass

    return AttentionContext(_A())


def _qkv(B, H, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _run(method, ctx, q, k, v, layout, kpm=None, layer=0):
    return run_method(method, q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=layer,
                      context=ctx, dense_fn=lambda: pytest.fail("the dense path must not run"))


def _video_positions(layout):
    t, _, _, _ = layout.token_coords()
    return t >= 0


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout,bm,bn,pad", [
    (TokenLayout.text_first((5, 7, 9), 11), 16, 8, False),  # N = 326: no block size divides it
    (TokenLayout.video_first((6, 6, 10), 13), 24, 16, True),  # HunyuanVideo style, padded text in batch 1
])
def test_output_equals_dense_with_the_executed_mask(spy, dtype, layout, bm, bn, pad):
    B, H, D, N = 2, 3, 16, layout.seq_len
    q, k, v = _qkv(B, H, N, D, seed=bm + bn, dtype=dtype)
    kpm = None
    if pad:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[1, N - 9 :] = False
    cfg = RainFusionConfig(sparsity=0.6, block_m=bm, block_n=bn, **SPARSE)
    method, ctx = RainFusionMethod(cfg), _ctx()
    out = _run(method, ctx, q, k, v, layout, kpm)
    (idx, cnt), = spy
    bmask = lists_to_block_mask(idx, cnt, -(-N // bn))
    assert not torch.equal(bmask[0], bmask[1]), "the batch elements should decide differently"
    mask = lists_to_token_mask(idx, cnt, N, N, bm, bn)
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    ref = masked_attention_reference(q, k, v, mask)
    assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else 1e-5)

    # the record counts exactly the pairs of that mask
    s = ctx.stats.summary()
    valid = kpm.sum() if kpm is not None else B * N
    assert s.density == pytest.approx(mask.sum().item() / (N * float(valid) * H), rel=1e-12)
    vid = _video_positions(layout)
    vmask = mask[:, :, vid][:, :, :, vid]
    assert s.video_density == pytest.approx(vmask.double().mean().item(), rel=1e-12)
    assert s.pattern_histogram["rf2"] == B * H and s.kernel_backends == {"torch": 1}
    dec = ctx.last_decisions[0]
    assert isinstance(dec, rf2.RF2Decision)
    np.testing.assert_allclose(dec.density, vmask.double().mean((-1, -2)).numpy(), rtol=1e-12)


def test_fully_padded_key_blocks_are_never_listed(spy):
    layout = TokenLayout.video_first((4, 6, 8), 24)  # text keys 192..215: blocks 24, 25, 26 of 8
    N = layout.seq_len
    q, k, v = _qkv(2, 2, N, 16, seed=3)
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[0, 200:] = False  # blocks 25, 26 fully padded in batch 0
    cfg = RainFusionConfig(sparsity=0.5, block_m=16, block_n=8, **SPARSE)
    _run(RainFusionMethod(cfg), _ctx(), q, k, v, layout, kpm)
    (idx, cnt), = spy
    bmask = lists_to_block_mask(idx, cnt, N // 8)
    assert not bmask[0, :, :, 25:].any()
    assert bmask[1, :, :, 24:].all() and bmask[0, :, :, 24].all()  # text columns stay dense where valid


# --------------------------------------------------------------------------- budget, forced regions, planted structure
GRID_LAYOUT = TokenLayout.text_first((9, 16, 16), 64)  # 2304 video tokens, text in one 64-block


@pytest.mark.parametrize("first_frame", ["sink", "none", "dense"])
@pytest.mark.parametrize("sigma", [0.5, 0.75, 0.9])
def test_executed_video_density_meets_the_budget(spy, sigma, first_frame):
    layout, bn = GRID_LAYOUT, 64
    N, nv = layout.seq_len, layout.num_video
    q, k, v = _qkv(1, 2, N, 16, seed=int(sigma * 100))
    cfg = RainFusionConfig(sparsity=sigma, block_m=64, block_n=bn, rf2_first_frame=first_frame, **SPARSE)
    method, ctx = RainFusionMethod(cfg), _ctx()
    _run(method, ctx, q, k, v, layout)
    (idx, cnt), = spy
    mask = lists_to_token_mask(idx, cnt, N, N, 64, bn)[0]  # (H, N, N)
    t, _, _, txt = layout.token_coords()
    vid = t >= 0
    density = mask[:, vid][:, :, vid].double().mean((-1, -2))
    plan = rf2.RF2Attention.of(method).plan(layout)
    stats = ctx.stats.summary()
    if plan.budget_met:
        assert (density <= 1 - sigma + 1e-12).all() and (density > 1 - sigma - bn / nv).all(), density
        assert "rf2_budget_unmet" not in stats.info
    else:  # sink at 9 frames costs 1/9 > 0.1: only the forced part runs, and the stats say so
        assert first_frame != "none" and sigma == 0.9
        assert torch.allclose(density, torch.tensor(plan.forced_density, dtype=torch.float64))
        assert "budget" in stats.info["rf2_budget_unmet"]
    assert stats.video_density == pytest.approx(density.mean().item(), rel=1e-12)
    # forced regions: text rows and columns, the first frame per rf2_first_frame
    assert mask[:, txt].all() and mask[:, :, txt].all()
    first = vid & (t == 0)
    assert mask[:, :, first].all() == (first_frame != "none")
    assert mask[:, first].all() == (first_frame == "dense")


def test_top_k_finds_the_planted_blocks(spy):
    """Each query block's q points at its own random set of key blocks: top-k picks exactly that set."""
    layout = GRID_LAYOUT
    N, K, D = layout.seq_len, layout.seq_len // 64, 64
    cfg = RainFusionConfig(sparsity=0.75, block_m=64, block_n=64, rf2_first_frame="none", **SPARSE)
    method = RainFusionMethod(cfg)
    plan = rf2.RF2Attention.of(method).plan(layout)
    kk = plan.blocks_per_row
    assert 0 < kk < K - 1
    g = torch.Generator().manual_seed(0)
    B, H = 2, 2
    k = torch.randn(B, H, N, D, generator=g) * 0.1
    k += 4.0 * torch.nn.functional.one_hot(torch.arange(N) // 64, D).float()  # key block j codes e_j
    targets = torch.stack([torch.randperm(K - 1, generator=g)[:kk] + 1 for _ in range(B * H * K)]).view(B, H, K, kk)
    code = torch.zeros(B, H, K, D).scatter_(-1, targets, 1.0)
    q = 4.0 * code.repeat_interleave(64, dim=2) + torch.randn(B, H, N, D, generator=g) * 0.1
    _run(method, _ctx(), q, k, torch.randn(B, H, N, D, generator=g), layout)
    (idx, cnt), = spy
    bmask = lists_to_block_mask(idx, cnt, K)
    want = torch.zeros(B, H, K, K, dtype=torch.bool).scatter_(-1, targets, True)
    want[..., 0] = True  # the text block is forced
    want[:, :, 0] = True
    assert torch.equal(bmask, want)


def test_planted_spatial_heads_keep_their_own_frame(spy):
    layout = GRID_LAYOUT  # 4 key blocks per frame; sigma 0.75 with a sink leaves k = 5 blocks per query block
    q, k, v = planted_qkv(layout, 1, ["spatial", "spatial"], head_dim=16)
    cfg = RainFusionConfig(sparsity=0.75, block_m=64, block_n=64, **SPARSE)
    _run(RainFusionMethod(cfg), _ctx(), q, k, v, layout)
    (idx, cnt), = spy
    bmask = lists_to_block_mask(idx, cnt, layout.seq_len // 64)[0]
    frame_of_block = (torch.arange(1, 37) - 1) // 4  # block 0 is text
    own = frame_of_block[:, None] == frame_of_block[None, :]
    assert bmask[:, 1:, 1:][:, own].all()


# --------------------------------------------------------------------------- schedule, reuse, context parallelism
def test_sparsity0_and_warmup_take_the_stock_path():
    layout = GRID_LAYOUT
    q, k, v = _qkv(1, 2, layout.seq_len, 16, seed=1)
    stock = torch.zeros_like(q)
    for cfg, reason in ((RainFusionConfig(mode="rf2", sparsity=0.0), "sparsity=0"),
                        (RainFusionConfig(mode="rf2", dense_steps=2, min_video_tokens=0), "dense layer"),
                        (RainFusionConfig(mode="rf2", dense_steps=2, dense_layers=0, min_video_tokens=0), "warm-up")):
        ctx = _ctx()
        out = run_method(RainFusionMethod(cfg), q, k, v, layout=layout, key_padding_mask=None, layer_index=0,
                         context=ctx, dense_fn=lambda: stock)
        assert out is stock
        (got,) = ctx.stats.summary().dense_fallbacks
        assert reason in got


def _attend(method, q, k, v, layout, *, layer=0, step=0, head_offset=0):
    return method.attend(q, k, v, layout=layout, key_padding_mask=None, scale=None,
                         call=CallInfo(layer_index=layer, step=step, head_offset=head_offset),
                         dense_fn=lambda: pytest.fail("dense"))


def test_reuse_steps_and_shared_layers(spy):
    layout = TokenLayout.text_first((5, 8, 8), 16)
    N = layout.seq_len
    inputs = [_qkv(1, 2, N, 16, seed=s) for s in range(4)]
    method = RainFusionMethod(RainFusionConfig(sparsity=0.7, block_m=16, block_n=16, rf2_reuse_steps=2, **SPARSE))
    reused = [_attend(method, *inputs[s], layout, step=s)[1].decision.reused for s in range(4)]
    assert reused == [False, True, False, True]
    assert torch.equal(spy[0][0], spy[1][0]) and not torch.equal(spy[1][0], spy[2][0])
    # the reused lists execute exactly on the new q, k, v
    out, _ = _attend(method, *inputs[3], layout, step=3)
    mask = lists_to_token_mask(*spy[-1], N, N, 16, 16)
    assert rel_err(out, masked_attention_reference(*inputs[3], mask)) < 1e-5

    spy.clear()
    shared = RainFusionMethod(RainFusionConfig(sparsity=0.7, block_m=16, block_n=16, rf2_share_layers=True, **SPARSE))
    decs = [_attend(shared, *inputs[layer], layout, layer=layer, step=0)[1].decision for layer in range(3)]
    assert [d.reused for d in decs] == [False, True, True]
    assert all(torch.equal(spy[0][0], c[0]) for c in spy)
    assert not _attend(shared, *inputs[0], layout, layer=1, step=1)[1].decision.reused  # a new step selects again
    # a different head slice (Ulysses rank) never reuses another slice's lists
    assert not _attend(shared, *inputs[0], layout, layer=2, step=1, head_offset=2)[1].decision.reused


def test_backward_through_fixed_lists_matches_masked_attention(spy):
    layout = TokenLayout.video_first((4, 6, 6), 10)
    N = layout.seq_len
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, N, 8, seed=7, dtype=torch.float64))
    method = RainFusionMethod(RainFusionConfig(sparsity=0.6, block_m=16, block_n=16, **SPARSE))
    out, _ = _attend(method, q, k, v, layout)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    mask = lists_to_token_mask(*spy[0], N, N, 16, 16)
    ref = torch.autograd.grad((masked_attention_reference(q, k, v, mask) * w).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert rel_err(g, r) < 1e-10


def test_config_validation_names_the_choices():
    with pytest.raises(ValueError, match=r"mode must be one of \('rf1', 'rf2'\)"):
        RainFusionConfig(mode="rf3")
    with pytest.raises(ValueError, match="rf2_first_frame must be one of"):
        RainFusionConfig(mode="rf2", rf2_first_frame="keep")
    with pytest.raises(ValueError, match="rf2_reuse_steps"):
        RainFusionConfig(mode="rf2", rf2_reuse_steps=0)
    with pytest.raises(ValueError, match="rf1 pattern"):
        RainFusionConfig(mode="rf2", force_pattern="spatial")
    assert RainFusionConfig().mode == "rf1" and RainFusionConfig(mode="rf2").rf2_first_frame == "sink"


def test_cogvideox_5b_480p_shape_reaches_the_density_target():
    """Shape-only: with the sink default, sigma 0.9 executes <= 0.12 of the video pairs at CogVideoX-5B 480p."""
    layout = TokenLayout.text_first((13, 30, 45), 226)
    sink = rf2.RF2Plan(layout, 128, 64, 0.9, "sink")
    assert sink.budget_met and sink.forced_density < 0.085 and sink.blocks_per_row > 0
    assert not rf2.RF2Plan(layout, 128, 64, 0.9, "dense").budget_met  # first-frame rows + columns ~0.15 alone


# --------------------------------------------------------------------------- tiny real transformers
@pytest.mark.parametrize("family", ["cogvideox", "hunyuan"])
def test_tiny_models_run_rf2(family, tiny_cogvideox, tiny_hunyuan):
    model = tiny_cogvideox if family == "cogvideox" else tiny_hunyuan
    inputs = cogvideox_inputs(model) if family == "cogvideox" else hunyuan_inputs()
    with torch.no_grad():
        ref = model(**inputs).sample
    apply_rainfusion(model, RainFusionConfig(sparsity=0.6, block_m=8, block_n=8, num_inference_steps=10, **SPARSE))
    with torch.no_grad():
        out = model(**inputs).sample
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.2
    stats = get_attention_stats(model, log=False)
    assert stats.pattern_histogram.get("rf2", 0) == stats.calls * 2 * 2  # every head of every call, B = H = 2
    assert stats.info["rainfusion_mode"] == "rf2" and stats.video_density < 1.0
    assert stats.kernel_backends == {"torch": stats.calls} and "select" in stats.timings_ms


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan"])
def test_tiny_model_sparsity0_is_bit_identical(family, tiny_cogvideox, tiny_hunyuan):
    model = tiny_cogvideox if family == "cogvideox" else tiny_hunyuan
    inputs = cogvideox_inputs(model) if family == "cogvideox" else hunyuan_inputs()
    with torch.no_grad():
        ref = model(**inputs).sample
    apply_rainfusion(model, RainFusionConfig(mode="rf2", sparsity=0.0, num_inference_steps=10))
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref)
    stats = get_attention_stats(model, log=False)
    assert stats.dense_fallbacks == {"sparsity=0": stats.calls} and stats.calls > 0


# --------------------------------------------------------------------------- the lean selection equals the plain one
def _plain_sums(x, block, weight=None):
    """Block sums: the full blocks as one (..., nb, block, D) view, then the short last block."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = x.shape[2]
    full = N // block
    parts = []
    for a, e, nb in ([(0, full * block, full)] if full else []) + ([(full * block, N, 1)] if N % block else []):
        xs = x[:, :, a:e].unflatten(2, (nb, (e - a) // nb))
        if weight is not None:
            xs = xs * weight[:, None, a:e, None].to(x.dtype).unflatten(2, (nb, (e - a) // nb))
        parts.append(xs.sum(3, dtype=acc))
    return torch.cat(parts, dim=2)


def _plain_select(q, k, plan, kpm):
    """rf2's selection written plainly (one op per step, no cached constants): lists, counts and stats."""
    d = plan.on(q.device)
    B, H, _, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_hat = _plain_sums(q, plan.block_m) / d["rows_pb"].to(acc)[:, None]
    if kpm is None:
        k_valid = d["keys_pb"].to(acc).expand(B, -1)
        k_sum = _plain_sums(k, plan.block_n)
    else:
        k_valid = _plain_sums(kpm[:, None, :, None].to(acc), plan.block_n)[:, 0, :, 0]
        k_sum = _plain_sums(k, plan.block_n, kpm)
    k_hat = k_sum / k_valid.clamp_min(1)[:, None, :, None]
    logits = (q_hat @ k_hat.transpose(-1, -2)) * D**-0.5 + k_valid.log()[:, None, None, :]
    has_keys = (k_valid > 0)[:, None, None, :]
    sel = (d["forced"] & has_keys).expand(B, H, -1, -1)
    if plan.blocks_per_row:
        cand = logits.masked_fill(~(d["candidates"] & has_keys), float("-inf"))
        # the documented tie rule: a stable descending sort, equal scores to the lower block index
        vals, idx = (t[..., : plan.blocks_per_row] for t in cand.sort(dim=-1, descending=True, stable=True))
        sel = sel | torch.zeros(cand.shape, dtype=torch.bool).scatter_(-1, idx, torch.isfinite(vals))
    kept = torch.where(sel, logits.softmax(-1), 0).sum(-1).to(torch.float64) @ d["vrows_pb"] / plan.layout.num_video
    s = sel.to(torch.float32)
    keys = torch.einsum("bhmk,bk->bhm", s, k_valid.to(torch.float32)).to(torch.float64) @ d["rows_pb"]
    vkeys = (s @ d["vkeys_pb"].to(torch.float32)).to(torch.float64) @ d["vrows_pb"]
    n_k = k_valid.sum(-1, dtype=torch.float64)[:, None].expand(B, H)
    stats = torch.stack([keys, vkeys, kept, n_k], dim=-1)
    # kernel lists: selected blocks ascending, padding repeats the last one (0 for an empty row)
    K, cnt = sel.shape[-1], sel.sum(-1)
    idx = torch.zeros(*sel.shape[:-1], plan.k_max, dtype=torch.int32)
    for pos in np.ndindex(*sel.shape[:-1]):
        listed = torch.nonzero(sel[pos]).flatten()
        row = torch.cat([listed, listed[-1:].expand(plan.k_max - len(listed))]) if len(listed) else idx[pos]
        idx[pos] = row.to(torch.int32)
    assert int(cnt.max()) <= plan.k_max <= K
    return sel, idx, cnt.to(torch.int32), stats, logits, cand if plan.blocks_per_row else None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("first_frame,sparsity", [("sink", 0.6), ("none", 0.9), ("dense", 0.5), ("sink", 0.99)])
@pytest.mark.parametrize("layout,bm,bn,pad", [
    (TokenLayout.text_first((5, 7, 9), 11), 16, 8, 0),  # no block size divides N = 326
    (TokenLayout.video_first((6, 6, 10), 13), 24, 16, 1),  # padded text keys in batch 1
    (TokenLayout.video_first((4, 6, 8), 24), 16, 8, 2),  # fully padded key blocks in batch 0
    (TokenLayout.text_first((4, 8, 8), 64), 64, 64, 0),  # N a multiple of both block sizes
])
def test_selection_is_bit_identical_to_the_plain_formulation(dtype, ties, first_frame, sparsity, layout, bm, bn, pad):
    B, H, D, N = 2, 3, 16, layout.seq_len
    g = torch.Generator().manual_seed(bm * 7 + bn + pad)
    q, k = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    if ties:  # few distinct values: many equal block scores, so top-k must break ties the same way
        q, k = q.round().clamp(-1, 1) * 0.5, k.round().clamp(-1, 1)
    # q as the usual (B, N, H, D) -> (B, H, N, D) transposed view: the pooling must not assume a layout
    q = q.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.cat([k, k], dim=-1).to(dtype)[..., D:]  # a view with a storage offset, as from a fused qkv
    kpm = None
    if pad:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[1, N - 9 :] = False
        if pad == 2:
            kpm[0, N - 3 * bn - 5 :] = False
    plan = rf2.RF2Plan(layout, bm, bn, sparsity, first_frame)
    sel_ref, idx_ref, cnt_ref, stats_ref, logits, cand = _plain_select(q, k, plan, kpm)
    sel, stats, _ = rf2._select(q, k, plan, kpm, None)
    idx, cnt = rf2.block_lists(sel, plan.k_max, plan.call_constants(q.device, B, H, logits.dtype)["list_keys"])
    assert torch.equal(sel, sel_ref)
    assert idx.dtype == cnt.dtype == torch.int32
    assert torch.equal(idx, idx_ref) and torch.equal(cnt, cnt_ref)
    assert stats.dtype == torch.float64 and torch.equal(stats, stats_ref)
    assert torch.equal(rf2.block_lists(sel, plan.k_max)[0], idx)  # the uncached keys give the same lists
    if kpm is not None:  # a fully padded key block is never listed
        empty = _plain_sums(kpm[:, None, :, None].float(), bn)[:, 0, :, 0] == 0
        assert (empty.any() or pad != 2) and not (sel & empty[:, None, None, :]).any()
    if cand is not None:  # the rule itself: per free row, each picked score >= each unpicked candidate score
        free = ~plan.on(q.device)["forced"].all(-1)
        picked = sel & ~plan.on(q.device)["forced"]
        lo = torch.where(picked, cand, float("inf")).amin(-1)
        hi = torch.where(~picked & torch.isfinite(cand), cand, float("-inf")).amax(-1)
        assert (lo[..., free] >= hi[..., free]).all()
        n_fin = torch.isfinite(cand).sum(-1).clamp(max=plan.blocks_per_row)
        assert torch.equal(picked.sum(-1)[..., free], n_fin[..., free])
        # ties at the threshold: every picked block with the lowest picked score precedes every unpicked one
        ar = torch.arange(cand.shape[-1])
        at_lo = (cand == lo[..., None]) & torch.isfinite(cand)
        last_picked = torch.where(picked & at_lo, ar, -1).amax(-1)
        first_left = torch.where(~picked & at_lo, ar, cand.shape[-1]).amin(-1)
        assert (last_picked[..., free] < first_left[..., free]).all()
        assert not ties or ((~picked & at_lo).any(-1) & (picked & at_lo).any(-1)).any()  # the case was met


def test_padding_constants_follow_the_mask():
    """The padding-derived tensors are reused for the same mask and rebuilt when it changes (in place or new)."""
    layout, bm, bn = TokenLayout.video_first((4, 6, 8), 24), 16, 8
    B, H, N = 2, 3, layout.seq_len
    q, k, _ = _qkv(B, H, N, 16, seed=11)
    plan = rf2.RF2Plan(layout, bm, bn, 0.7, "sink")
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, N - 9 :] = False
    masks = []
    for edit in (None, None, "in_place", "new", "inference"):
        if edit == "in_place":
            kpm[0, N - 30 :] = False  # two more key blocks fully padded in batch 0
        elif edit == "new":
            kpm = torch.ones(B, N, dtype=torch.bool)
            kpm[:, N - 17 :] = False
        elif edit == "inference":
            with torch.inference_mode():
                kpm = kpm.clone()
                kpm[1, : N // 2] = False
        sel, stats, _ = rf2._select(q, k, plan, kpm, None)
        sel_ref, _, _, stats_ref, _, _ = _plain_select(q, k, plan, kpm)
        assert torch.equal(sel, sel_ref) and torch.equal(stats, stats_ref), edit
        masks.append(sel)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[2], masks[3]) and not torch.equal(masks[3], masks[4])
