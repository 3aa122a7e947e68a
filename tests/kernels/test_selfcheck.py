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
    block_sparse_attention,
    block_sparse_attention_table,
    block_sparse_attention_torch,
    num_blocks,
    register_backend,
    select_backend,
    selfcheck,
    unregister_backend,
)
from diffusers_attn.kernels.registry import BLOCK_SPARSE, TABLE, table_from_lists
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


@pytest.fixture
def backend(monkeypatch):
    """Register a test backend ahead of every other one (automatic on every device); self-check on."""
    monkeypatch.setenv("DIFFATTN_SELF_CHECK", "1")
    monkeypatch.setenv("DIFFATTN_FLEX_COMPILE", "0")
    selfcheck.reset()
    names = []

    def add(name, fn):
        names.append(name)
        register_backend(BLOCK_SPARSE, name, fn, auto=lambda *a: True, order=-100)
        register_backend(TABLE, name, table_from_lists(fn), auto=lambda *a: True, order=-100)

    yield add
    for name in names:
        unregister_backend(BLOCK_SPARSE, name)
        unregister_backend(TABLE, name)
    selfcheck.reset()


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


def test_failures_visible_in_rainfusion_stats(backend):
    backend("wrong", _ignores_lists)
    layout = TokenLayout.video_first((4, 6, 8), 10)
    q, k, v = planted_qkv(layout, 1, ["spatial", "temporal", "textural", "random"], 16)
    outs = {}
    for name in (None, "torch"):
        cfg = RainFusionConfig(
            sparsity=0.75,
            dense_steps=0,
            dense_layers=0,
            min_video_tokens=0,
            block_m=16,
            block_n=16,
            arm_threshold=0.95,
            kernel_backend=name,
        )
        ctx = AttentionContext(object())  # the method never touches the adapter
        outs[name] = run_method(
            RainFusionMethod(cfg),
            q,
            k,
            v,
            layout=layout,
            key_padding_mask=None,
            scale=None,
            layer_index=0,
            context=ctx,
            dense_fn=lambda: pytest.fail("mixed heads are sparse"),
        )
        if name is None:
            fails = ctx.stats.info["kernel_self_check_failures"]
            assert [f["backend"] for f in fails] == ["wrong"] and fails[0]["fallback"] == "flex"
            assert ctx.stats.kernel_calls == {"flex": 1}
    assert np.isfinite(outs[None].numpy()).all() and rel_err(outs[None], outs["torch"]) < 2e-6
