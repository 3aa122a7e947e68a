"""The one kernel registry: every operation dispatches through it, custom backends register on any operation,
explicit requests fail with the backend's reason, unknown names list what is available."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from diffusers_attn import kernels
from diffusers_attn.kernels import (
    OPERATIONS,
    available_backends,
    biwkv,
    block_mask_to_lists,
    block_sparse_attention,
    block_sparse_attention_table,
    block_topk_select,
    probe_block_mass,
    register_backend,
    registry,
    select_backend,
    select_biwkv_backend,
    unregister_backend,
)

ROOT = Path(__file__).resolve().parents[2]


def _attn_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(3))
    idx, cnt = block_mask_to_lists(torch.ones(1, 2, 2, 2, dtype=torch.bool))
    return q, k, v, idx, cnt


def _calls():
    """A call of each operation's public entry point, with the given backend."""
    q, k, v, idx, cnt = _attn_inputs()
    t_idx, t_cnt, head_table = idx[0, :1].contiguous(), cnt[0, :1].contiguous(), torch.zeros(1, 2, dtype=torch.int32)
    kb = torch.randn(2, 6, 3)
    w, u = torch.full((3,), 0.1), torch.zeros(3)
    return {
        "block_sparse_attention": lambda b: block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16,
                                                                   backend=b),
        "block_sparse_attention_table": lambda b: block_sparse_attention_table(
            q, k, v, t_idx, t_cnt, head_table, block_m=16, block_n=16, backend=b),
        "probe_block_mass": lambda b: probe_block_mass(q[:, :, :4], k, block_n=16, backend=b)[0],
        "biwkv": lambda b: biwkv(kb, kb, w, u, backend=b),
        "block_topk_select": lambda b: block_topk_select(q, k, torch.eye(4, 8, dtype=torch.bool), block_m=8,
                                                         block_n=4, topk=2, k_max=3, backend=b),
    }


def _counting(op: str, counter: Counter):
    """A backend that counts its calls and runs the op's exact reference."""
    ref = {"block_sparse_attention": "torch", "block_sparse_attention_table": "torch",
           "probe_block_mass": "torch", "biwkv": "chunked", "block_topk_select": "torch"}[op]
    inner = registry.backend_fn(op, ref)

    def fn(*args, **kwargs):
        counter[op] += 1
        return inner(*args, **kwargs)

    return fn


def test_every_operation_is_registered():
    assert set(OPERATIONS) == set(_calls())
    for op in OPERATIONS:
        assert available_backends(op)


@pytest.mark.parametrize("op", sorted(_calls()))
def test_custom_backend_is_used_then_removed(op, monkeypatch):
    monkeypatch.delenv("DIFFATTN_KERNEL", raising=False)
    call = _calls()[op]
    expected = call(None)
    counter: Counter = Counter()
    register_backend(op, "counting", _counting(op, counter), lambda *args: None)
    try:
        assert available_backends(op)[0] == "counting"  # preferred: ahead of the built-ins
        torch.testing.assert_close(call(None), expected)  # automatic selection takes it
        assert counter[op] == 1
        torch.testing.assert_close(call("counting"), expected)
        assert counter[op] == 2
        monkeypatch.setenv("DIFFATTN_KERNEL", "counting")  # the environment override names it too
        call(None)
        assert counter[op] == 3
    finally:
        unregister_backend(op, "counting")
    monkeypatch.delenv("DIFFATTN_KERNEL")
    assert "counting" not in available_backends(op)
    call(None)
    assert counter[op] == 3


@pytest.mark.parametrize("op", sorted(_calls()))
def test_explicit_backend_that_cannot_run_raises_its_reason(op):
    counter: Counter = Counter()
    register_backend(op, "picky", _counting(op, counter), lambda *args: "it only runs on Tuesdays", order=-1000)
    try:
        assert available_backends(op)[0] == "picky"
        _calls()[op](None)
        assert counter[op] == 0  # automatic selection tries it first and skips it
        with pytest.raises(ValueError, match="'picky' cannot run this call: it only runs on Tuesdays"):
            _calls()[op]("picky")
    finally:
        unregister_backend(op, "picky")


@pytest.mark.parametrize("op", sorted(_calls()))
def test_unknown_backend_lists_the_available_ones(op):
    with pytest.raises(ValueError, match="unknown .*backend 'nope'") as e:
        _calls()[op]("nope")
    for name in ["auto", *available_backends(op)]:
        assert repr(name) in str(e.value)


def test_auto_predicate_and_order():
    """``auto`` gates automatic selection only; ``order`` decides among the allowed backends."""
    op = "block_sparse_attention"
    counter: Counter = Counter()
    q, k, v, *_ = _attn_inputs()
    register_backend(op, "late", _counting(op, counter), None, order=1000)
    register_backend(op, "gpu-only", _counting(op, counter), None, auto=lambda q, *rest: q.is_cuda, order=-5)
    try:
        assert available_backends(op)[0] == "gpu-only" and available_backends(op)[-1] == "late"
        assert select_backend(q, k, v, 16, 16) == "torch"  # gpu-only declines CPU tensors; torch comes before late
        assert select_backend(q, k, v, 16, 16, "gpu-only") == "gpu-only"  # an explicit request only needs supports
    finally:
        unregister_backend(op, "late")
        unregister_backend(op, "gpu-only")


def test_legacy_block_sparse_registration_covers_the_table_variant():
    """``register_backend(name, fn, supports, auto=..., preferred=...)``: the block-sparse-only form of old."""
    counter: Counter = Counter()
    fn = _counting("block_sparse_attention", counter)
    register_backend("legacy", fn, lambda q, k, v, bm, bn: None, auto=lambda q: True, preferred=False)
    try:
        assert available_backends()[-1] == "legacy"  # not preferred: after torch
        assert available_backends("block_sparse_attention_table")[-1] == "legacy"
        calls = _calls()
        torch.testing.assert_close(calls["block_sparse_attention_table"]("legacy"),
                                   calls["block_sparse_attention_table"]("torch"))
        calls["block_sparse_attention"]("legacy")
        assert counter["block_sparse_attention"] == 2
    finally:
        unregister_backend("block_sparse_attention", "legacy")
        unregister_backend("block_sparse_attention_table", "legacy")


def test_biwkv_torch_alias_picks_the_stable_pytorch_form():
    k = torch.randn(1, 8, 3)
    assert select_biwkv_backend(k, torch.full((3,), 0.1), "torch") == "cumsum"
    assert select_biwkv_backend(k, torch.full((3,), 100.0), "torch") == "chunked"  # |w| T beyond the cumsum range
    assert select_biwkv_backend(k, torch.zeros(3), "reference") == "reference"  # the oracle only when asked for


def test_unknown_operation_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel operation 'conv'.*biwkv"):
        register_backend("conv", "x", lambda: None, None)


def test_kernels_import_nothing_outside_the_kernels_package_but_env():
    """``ops`` (and everything else) calls ``kernels``, never the reverse; ``_env`` is the one bottom module."""
    bad = []
    for path in sorted((ROOT / "diffusers_attn" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # relative, above the kernels package
                env = node.module == "_env" or (node.module is None and all(a.name == "_env" for a in node.names))
                if node.level > 2 or not env:
                    bad.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    if n.startswith("diffusers_attn") and not n.startswith(("diffusers_attn.kernels",
                                                                              "diffusers_attn._env")):
                        bad.append(f"{path.name}:{node.lineno} import {n}")
    assert not bad, bad


def test_compile_ops_live_in_kernels_and_ops_reexports_them():
    from diffusers_attn import ops
    from diffusers_attn.kernels import compile_ops

    assert ops.block_sparse_attention_op is compile_ops.block_sparse_attention_op
    assert ops.block_sparse_attention_table_op is compile_ops.block_sparse_attention_table_op
    assert hasattr(torch.ops.diffusers_attn, "block_sparse_attention")
    assert hasattr(torch.ops.diffusers_attn, "block_sparse_attention_table")
    assert kernels.block_sparse_attention_op is compile_ops.block_sparse_attention_op


def test_package_import_leaves_triton_modules_unloaded():
    code = ("import sys, diffusers_attn.kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('diffusers_attn.kernels.') and "
            "m.endswith('_triton')))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
