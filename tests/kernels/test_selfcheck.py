"""First-use self-check: a wrong kernel is caught on its first call, logged once, and its calls fall back."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import rel_err

from diffusers_attn.adapters import run_method
from diffusers_attn.context import AttentionContext
from diffusers_attn.kernels import (
    block_mask_to_lists,
    block_select,
    block_sparse_attention,
    block_sparse_attention_table,
    block_sparse_attention_torch,
    block_topk_select,
    block_topk_select_torch,
    key_blocks,
    num_blocks,
    probe_block_mass,
    probe_block_mass_torch,
    register_backend,
    select_backend,
    selfcheck,
    unregister_backend,
)
from diffusers_attn.kernels.registry import BLOCK_SPARSE, PROBE, SELECT, TABLE, available_backends, table_from_lists
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod
from diffusers_attn.testing import planted_qkv

pytest.importorskip("torch.nn.attention.flex_attention")


def _ignores_lists(
    q, k, v, kv_indices, kv_counts, *, block_m, block_n, key_padding_mask=None, scale=None, return_lse=False
):
    """Deliberately wrong: dense attention over every valid key, whatever the lists say."""
    mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _raises(*args, **kwargs):
    raise RuntimeError("no kernel image is available for execution on the device")


def _correct(q, k, v, kv_indices, kv_counts, **kwargs):
    return block_sparse_attention_torch(q, k, v, kv_indices, kv_counts, impl="math", **kwargs)


def _inject(monkeypatch, ops):
    """Fixture body: ``add(name, fn)`` registers ``wrap(fn)`` for each ``(op, wrap)`` of ``ops`` ahead of every
    other backend (automatic on every device), with the self-check on; everything is removed afterwards."""
    monkeypatch.setenv("DIFFATTN_SELF_CHECK", "1")
    selfcheck.reset()
    names = []

    def add(name, fn):
        names.append(name)
        for op, wrap in ops:
            register_backend(op, name, wrap(fn), auto=lambda *a: True, order=-100)

    yield add
    for name in names:
        for op, _ in ops:
            unregister_backend(op, name)
    selfcheck.reset()


@pytest.fixture
def backend(monkeypatch):
    """A test attention backend (lists and table forms) ahead of every other one; self-check on."""
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "0")
    yield from _inject(monkeypatch, [(BLOCK_SPARSE, lambda fn: fn), (TABLE, table_from_lists)])


def _problem(seed=0, B=2, H=2, n=80, D=32, bm=16, bn=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    mask = torch.rand(B, H, num_blocks(n, bm), num_blocks(n, bn), generator=g) < 0.4
    mask[..., 0] = True
    idx, cnt = block_mask_to_lists(mask)
    return q, k, v, idx, cnt


@pytest.mark.parametrize("wrong", [_ignores_lists, _raises])
def test_wrong_kernel_falls_back_logs_once_and_records(backend, wrong, caplog):
    backend("wrong", wrong)
    q, k, v, idx, cnt = _problem()
    with caplog.at_level(logging.ERROR, logger="diffusers_attn.kernels.selfcheck"):
        out = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)  # automatic: "wrong" comes first
        out2 = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, backend="wrong")
        assert select_backend(q, k, v, 16, 16) == "flex"
    ref = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, backend="torch")
    assert rel_err(out, ref) < 2e-6 and rel_err(out2, ref) < 2e-6  # ran on flex, not on the wrong kernel
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    msg = errors[0].getMessage()
    assert "'wrong'" in msg and "self-check" in msg and "float32 head_dim 32" in msg and "'flex'" in msg
    assert ("relative error" in msg) if wrong is _ignores_lists else ("raised RuntimeError" in msg)
    (fail,) = [f for f in selfcheck.self_check_failures() if f["operation"] == BLOCK_SPARSE]
    assert fail["backend"] == "wrong" and fail["fallback"] == "flex" and fail["head_dim"] == 32
    if wrong is _ignores_lists:
        assert fail["relative_error"] > 10 * fail["tolerance"]
    # the table operation is checked on its own, and falls back the same way
    ht = torch.zeros(2, 2, dtype=torch.int32)
    out_t = block_sparse_attention_table(q, k, v, idx[0, 0][None], cnt[0, 0][None], ht, block_m=16, block_n=16)
    ref_t = block_sparse_attention_table(
        q, k, v, idx[0, 0][None], cnt[0, 0][None], ht, block_m=16, block_n=16, backend="torch"
    )
    assert rel_err(out_t, ref_t) < 2e-6
    assert {f["operation"] for f in selfcheck.self_check_failures()} == {BLOCK_SPARSE, TABLE}


def test_correct_kernel_passes_and_runs(backend, caplog):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return _correct(*args, **kwargs)

    backend("good", counted)
    q, k, v, idx, cnt = _problem(seed=1)
    with caplog.at_level(logging.ERROR):
        out = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
        block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert selfcheck.self_check_failures() == []
    assert len(calls) == 2 + 2  # the check's two calls (with and without padding) once, then the two real calls
    ref = block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, backend="torch")
    assert rel_err(out, ref) < 1e-6


def test_flex_passes_its_own_check(backend):
    q, k, v, idx, cnt = _problem(seed=2, D=64)
    block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, backend="flex")
    assert selfcheck.self_check_failures() == []


def test_off_and_env_validation(backend, monkeypatch):
    monkeypatch.setenv("DIFFATTN_SELF_CHECK", "0")
    backend("wrong", _ignores_lists)
    q, k, v, _, _ = _problem()
    assert select_backend(q, k, v, 16, 16) == "wrong"  # unchecked: runs as requested
    monkeypatch.setenv("DIFFATTN_SELF_CHECK", "auto")
    assert not selfcheck.enabled(torch.device("cpu")) and selfcheck.enabled(torch.device("cuda"))
    monkeypatch.setenv("DIFFATTN_SELF_CHECK", "on")
    with pytest.raises(ValueError, match="'auto', '0' or '1'"):
        selfcheck.enabled(torch.device("cpu"))


def _rainfusion_call(q, k, v, layout, kpm, kernel_backend):
    """One sparse RainFusion layer call with ``kernel_backend`` (None: automatic): (output, context)."""
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=0, dense_layers=0, min_video_tokens=0, block_m=16, block_n=16,
                           arm_threshold=0.95, kernel_backend=kernel_backend)
    ctx = AttentionContext(object())  # the method never touches the adapter
    out = run_method(RainFusionMethod(cfg), q, k, v, layout=layout, key_padding_mask=kpm, scale=None, layer_index=0,
                     context=ctx, dense_fn=lambda: pytest.fail("mixed heads are sparse"))
    return out, ctx


def test_failures_visible_in_rainfusion_stats(backend):
    backend("wrong", _ignores_lists)
    layout = TokenLayout.video_first((4, 6, 8), 10)
    q, k, v = planted_qkv(layout, 1, ["spatial", "temporal", "textural", "random"], 16)
    outs = {}
    for name in (None, "torch"):
        outs[name], ctx = _rainfusion_call(q, k, v, layout, None, name)
        if name is None:
            fails = ctx.stats.info["kernel_self_check_failures"]
            assert [f["backend"] for f in fails] == ["wrong"] and fails[0]["fallback"] == "flex"
            assert ctx.stats.kernel_calls == {"flex": 1}
    assert np.isfinite(outs[None].numpy()).all() and rel_err(outs[None], outs["torch"]) < 2e-6


# ----------------------------------------------------------------------------- the ARM probe (probe_block_mass)


def _probe_ignores_padding(q, k, *, block_n, key_padding_mask=None, scale=None, token_weights=None):
    """Deliberately wrong: softmax over every key, padded ones included (a plausible kernel bug)."""
    return probe_block_mass_torch(q, k, block_n=block_n, scale=scale, token_weights=token_weights)


@pytest.fixture
def probe_backend(monkeypatch):
    """A test probe backend ahead of every other one; self-check on."""
    yield from _inject(monkeypatch, [(PROBE, lambda fn: fn)])


def _probe_inputs(seed=0, B=2, H=2, P=13, n=70, D=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, P, H, D, generator=g).to(dtype).transpose(1, 2)  # BSHD viewed as BHSD
    k = torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2)
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[1, n - 20 :] = False
    tw = (torch.rand(n, generator=g) < 0.5).float()
    return q, k, kpm, tw


@pytest.mark.parametrize("wrong", [_probe_ignores_padding, _raises])
def test_wrong_probe_falls_back_logs_once_and_records(probe_backend, wrong, caplog):
    probe_backend("wrong", wrong)
    q, k, kpm, tw = _probe_inputs()
    kw = {"block_n": 16, "key_padding_mask": kpm, "token_weights": tw}
    with caplog.at_level(logging.ERROR, logger="diffusers_attn.kernels.selfcheck"):
        mass, tmass = probe_block_mass(q, k, **kw)  # automatic: "wrong" comes first
        mass2, tmass2 = probe_block_mass(q, k, backend="wrong", **kw)
    ref, ref_t = probe_block_mass(q, k, backend="torch", **kw)
    for got, want in ((mass, ref), (tmass, ref_t), (mass2, ref), (tmass2, ref_t)):
        assert torch.equal(got, want)  # ran on the PyTorch probe, not on the wrong one
    if wrong is _probe_ignores_padding:  # and the wrong one would have differed on these inputs
        assert rel_err(_probe_ignores_padding(q, k, **kw)[0], ref) > 0.05
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    msg = errors[0].getMessage()
    assert "'wrong' probe kernel" in msg and "self-check" in msg and "float32 head_dim 32 (block_n 16)" in msg
    assert "'torch'" in msg
    assert ("relative error" in msg) if wrong is _probe_ignores_padding else ("raised RuntimeError" in msg)
    (fail,) = selfcheck.self_check_failures()
    assert fail["operation"] == PROBE and fail["backend"] == "wrong" and fail["fallback"] == "torch"
    assert fail["head_dim"] == 32 and fail["block_n"] == 16 and fail["block_m"] is None
    if wrong is _probe_ignores_padding:
        assert fail["relative_error"] > 10 * fail["tolerance"]
    assert selfcheck.stats_info() == {"kernel_self_check_failures": [fail]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_correct_probe_passes_once_per_key(probe_backend, dtype, caplog):
    calls = []

    def counted(q, k, **kwargs):
        calls.append(q.dtype)
        return probe_block_mass_torch(q.float(), k.float(), **kwargs)

    probe_backend("good", counted)
    q, k, kpm, tw = _probe_inputs(seed=1, dtype=dtype)
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            mass, tmass = probe_block_mass(q, k, block_n=16, key_padding_mask=kpm, token_weights=tw)
        assert len(calls) == 2 + 2  # the check's two runs once, then the two real calls
        probe_block_mass(q, k, block_n=32, key_padding_mask=kpm, token_weights=tw)  # another key: checked again
        assert len(calls) == 4 + 2 + 1
        probe_block_mass(q[..., :16], k[..., :16], block_n=32)  # another head_dim
        assert len(calls) == 7 + 2 + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert selfcheck.self_check_failures() == [] and selfcheck.stats_info() == {}
    ref, ref_t = probe_block_mass(q, k, block_n=16, key_padding_mask=kpm, token_weights=tw, backend="torch")
    assert rel_err(mass, ref) < 1e-6 and rel_err(tmass, ref_t) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_probe_passes_its_own_check(probe_backend, dtype):
    pytest.importorskip("triton")
    if "triton" not in available_backends(PROBE):
        pytest.skip("triton probe backend not registered")
    q, k, kpm, tw = _probe_inputs(seed=2, dtype=dtype)
    mass, tmass = probe_block_mass(q, k, block_n=16, key_padding_mask=kpm, token_weights=tw, backend="triton")
    assert selfcheck.self_check_failures() == []
    ref, ref_t = probe_block_mass(q, k, block_n=16, key_padding_mask=kpm, token_weights=tw, backend="torch")
    assert rel_err(mass, ref) < 2e-3 and rel_err(tmass, ref_t) < 2e-3


def test_probe_check_off(probe_backend, monkeypatch):
    monkeypatch.setenv("DIFFATTN_SELF_CHECK", "0")
    probe_backend("wrong", _probe_ignores_padding)
    q, k, kpm, tw = _probe_inputs()
    mass, _ = probe_block_mass(q, k, block_n=16, key_padding_mask=kpm, token_weights=tw)
    ref, _ = probe_block_mass(q, k, block_n=16, key_padding_mask=kpm, token_weights=tw, backend="torch")
    assert rel_err(mass, ref) > 0.05  # unchecked: the wrong kernel ran as requested
    assert selfcheck.self_check_failures() == []


def test_probe_failure_visible_in_rainfusion_stats(probe_backend, monkeypatch):
    probe_backend("wrong", _probe_ignores_padding)
    layout = TokenLayout.video_first((4, 6, 8), 10)
    q, k, v = planted_qkv(layout, 1, ["spatial", "temporal", "textural", "random"], 16)
    kpm = torch.ones(1, layout.seq_len, dtype=torch.bool)
    kpm[:, -4:] = False  # padded text tokens: where the wrong probe differs
    outs, recalls = {}, {}
    for run, name in (("checked", None), ("torch", "torch"), ("unchecked", None)):
        if run == "unchecked":
            monkeypatch.setenv("DIFFATTN_SELF_CHECK", "0")
        outs[run], ctx = _rainfusion_call(q, k, v, layout, kpm, name)
        recalls[run] = torch.as_tensor(ctx.last_decisions[0].recalls)
        if run == "checked":
            fails = ctx.stats.info["kernel_self_check_failures"]
            assert [(f["operation"], f["backend"], f["fallback"]) for f in fails] == [(PROBE, "wrong", "torch")]
    assert torch.equal(recalls["checked"], recalls["torch"])  # ARM ran on the PyTorch probe
    assert rel_err(recalls["unchecked"], recalls["torch"]) > 1e-3  # which the wrong probe would not have matched
    assert np.isfinite(outs["checked"].numpy()).all() and rel_err(outs["checked"], outs["torch"]) < 2e-6


# ----------------------------------------------------------------------------- block selection (block_topk_select)


def _select_ignores_padding(q, k, forced, keys, row_weights, col_weights, **kw):
    """Deliberately wrong: scores and lists as if no key were padded (fully padded blocks get listed)."""
    return block_topk_select_torch(q, k, forced, key_blocks(k.shape[2], kw["block_n"], None, q.device), row_weights,
                                   col_weights, **kw)


_TOPK_LOWER = block_select.topk_lower_index


def _topk_higher_index(scores, eligible, k):
    return _TOPK_LOWER(scores.flip(-1), eligible.flip(-1), k).flip(-1)


def _select_ties_to_higher_index(*args, **kw):
    """Deliberately wrong: the reference with equal scores going to the higher block index."""
    saved = block_select.topk_lower_index
    block_select.topk_lower_index = _topk_higher_index  # the reference looks the rule up in its module
    try:
        return block_topk_select_torch(*args, **kw)
    finally:
        block_select.topk_lower_index = saved


@pytest.fixture
def sel_backend(monkeypatch):
    """A test selection backend ahead of every other one; self-check on."""
    yield from _inject(monkeypatch, [(SELECT, lambda fn: fn)])


def _select_inputs(seed=0, B=2, H=2, n=100, D=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2)
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[1, 16:32] = False  # a fully padded key block of 16
    forced = torch.zeros(num_blocks(n, 16), num_blocks(n, 16), dtype=torch.bool)
    forced[:, 1] = True
    return q, k, kpm, forced


@pytest.mark.parametrize("wrong", [_select_ignores_padding, _select_ties_to_higher_index, _raises])
def test_wrong_selection_falls_back_logs_once_and_records(sel_backend, wrong, caplog):
    sel_backend("wrong", wrong)
    q, k, kpm, forced = _select_inputs()
    kw = {"block_m": 16, "block_n": 16, "topk": 2, "k_max": forced.shape[1], "key_padding_mask": kpm}
    with caplog.at_level(logging.ERROR, logger="diffusers_attn.kernels.selfcheck"):
        got = block_topk_select(q, k, forced, **kw)  # automatic: "wrong" comes first
        got2 = block_topk_select(q, k, forced, backend="wrong", **kw)
    want = block_topk_select(q, k, forced, backend="torch", **kw)
    for a, b in zip(got + got2, want + want):
        assert torch.equal(a, b)  # ran on the PyTorch reference
    if wrong is _select_ignores_padding:  # the wrong one differs here (it lists the padded block)
        assert not torch.equal(wrong(q, k, forced, None, torch.ones(forced.shape[0], 3, dtype=torch.float64),
                                     torch.ones(forced.shape[1]), **{x: kw[x] for x in kw if x != "key_padding_mask"},
                                     scale=None)[0], want[0])
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    msg = errors[0].getMessage()
    assert "'wrong' block selection kernel" in msg and "float32 head_dim 32 (blocks 16x16)" in msg and "'torch'" in msg
    assert ("raised RuntimeError" in msg) if wrong is _raises else ("different block lists" in msg)
    (fail,) = selfcheck.self_check_failures()
    assert fail["operation"] == SELECT and fail["backend"] == "wrong" and fail["fallback"] == "torch"
    assert fail["block_m"] == 16 and fail["block_n"] == 16 and fail["value_dim"] is None


def test_wrong_selection_is_not_used_by_rf2(sel_backend):
    """rf2 asks the registry for its selection backend: a failed one leaves it on its PyTorch path."""
    from diffusers_attn.methods.rainfusion import rf2

    sel_backend("wrong", _select_ignores_padding)
    layout = TokenLayout.video_first((4, 6, 8), 24)
    q, k, _ = planted_qkv(layout, 2, ["spatial", "temporal"], 16)
    kpm = torch.ones(2, layout.seq_len, dtype=torch.bool)
    kpm[0, -20:] = False  # two fully padded key blocks of 8
    cfg = RainFusionConfig(mode="rf2", sparsity=0.6, block_m=16, block_n=8, dense_steps=0, dense_layers=0,
                           min_video_tokens=0)
    att = rf2.RF2Attention.of(RainFusionMethod(cfg))
    plan = att.plan(layout)
    c = plan.call_constants(q.device, 2, 2, torch.float32)
    (idx, cnt), stats = att._select_lists(q, k, plan, c, kpm, None)
    sel, rstats, _ = rf2._select(q, k, plan, kpm, None)
    ridx, rcnt = rf2.block_lists(sel, plan.k_max)
    assert torch.equal(idx, ridx) and torch.equal(cnt, rcnt) and torch.equal(stats, rstats)
    assert [f["backend"] for f in selfcheck.self_check_failures()] == ["wrong"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_selection_passes_its_own_check(sel_backend, dtype):
    pytest.importorskip("triton")
    if "triton" not in available_backends(SELECT):
        pytest.skip("triton selection backend not registered")
    q, k, kpm, forced = _select_inputs(seed=2, dtype=dtype)
    kw = {"block_m": 16, "block_n": 16, "topk": 2, "k_max": forced.shape[1], "key_padding_mask": kpm}
    got = block_topk_select(q, k, forced, backend="triton", **kw)
    assert selfcheck.self_check_failures() == []
    want = block_topk_select(q, k, forced, backend="torch", **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and rel_err(got[2], want[2]) < 1e-5
