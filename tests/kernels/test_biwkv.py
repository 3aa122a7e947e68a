"""Bi-WKV: closed form and chunked form vs the O(T^2) definition, gradients, symmetry, Triton kernel, dispatch."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_attn.kernels.biwkv import (
    CUMSUM_MAX_DECAY,
    biwkv,
    biwkv_chunked,
    biwkv_cumsum,
    biwkv_reference,
    select_biwkv_backend,
)


def make(B, T, C, decay, seed, dtype=torch.float64, normalise=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64) * decay / (T if normalise else 1)
    u = torch.randn(C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (k, v, w, u)]


@pytest.mark.parametrize("T", [1, 2, 7, 64])
@pytest.mark.parametrize("delta", [0, 1])
@pytest.mark.parametrize("decay", [-5.0, 1.0, 5.0, 20.0])
def test_closed_forms_match_definition(T, delta, decay):
    k, v, w, u = make(2, T, 6, decay, seed=T * 7 + delta)
    ref = biwkv_reference(k, v, w, u, delta)
    assert (biwkv_cumsum(k, v, w, u, delta) - ref).abs().max() < 1e-12
    assert (biwkv_chunked(k, v, w, u, delta, chunk=5) - ref).abs().max() < 1e-12


def test_definition_by_hand():
    """The oracle itself against an explicit loop for one channel."""
    k, v, w, u = make(1, 5, 1, 3.0, seed=3)
    out = biwkv_reference(k, v, w, u, 0)
    for t in range(5):
        wt = [torch.exp(u[0] + k[0, i, 0]) if i == t else torch.exp(-abs(t - i) * w[0] + k[0, i, 0]) for i in range(5)]
        expect = sum(a * v[0, i, 0] for i, a in enumerate(wt)) / sum(wt)
        assert abs(float(out[0, t, 0] - expect)) < 1e-12


def test_chunked_stable_for_unnormalised_large_decay():
    """w * T far beyond what the global closed form can hold (both signs): chunked stays exact, finite."""
    k, v, w, u = make(1, 150, 4, 3.0, seed=11, normalise=False)  # |w| T ~ 450
    w[0] = -2.5  # far tokens dominate
    ref = biwkv_reference(k, v, w, u, 0)
    out = biwkv_chunked(k.float(), v.float(), w.float(), u.float(), 0, chunk=32)
    assert rel_err(out, ref) < 1e-5
    assert select_biwkv_backend(k, w) == "chunked"  # the dispatcher never picks the unstable form
    assert select_biwkv_backend(k, w / 1000) == "cumsum"


def test_delta_reparametrisation():
    """delta = 1 with bonus u equals delta = 0 with bonus u - w."""
    k, v, w, u = make(2, 9, 5, 4.0, seed=5)
    a = biwkv_cumsum(k, v, w, u, 1)
    b = biwkv_cumsum(k, v, w, u - w, 0)
    assert (a - b).abs().max() < 1e-12


def test_symmetry_and_constant_values():
    k, v, w, u = make(2, 13, 4, 6.0, seed=9)
    out = biwkv_cumsum(k, v, w, u, 0)
    flipped = biwkv_cumsum(k.flip(1), v.flip(1), w, u, 0)
    assert (flipped.flip(1) - out).abs().max() < 1e-12
    const = torch.full_like(v, 2.5)
    assert (biwkv_cumsum(k, const, w, u, 0) - 2.5).abs().max() < 1e-12


@pytest.mark.parametrize("fn", ["cumsum", "chunked"])
def test_gradcheck_float64(fn):
    k, v, w, u = make(1, 6, 3, 4.0, seed=2)
    args = [x.clone().requires_grad_() for x in (k, v, w, u)]
    f = (lambda *a: biwkv_cumsum(*a, 1)) if fn == "cumsum" else (lambda *a: biwkv_chunked(*a, 0, chunk=4))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)


def test_fp32_cumsum_at_the_clamp():
    """The fp32 closed form at the largest decay the dispatcher allows (|w| T = 60) against fp64."""
    k, v, w, u = make(2, 64, 8, 1.0, seed=4)
    w = torch.sign(w) * CUMSUM_MAX_DECAY / 64
    ref = biwkv_reference(k, v, w, u, 0)
    out = biwkv_cumsum(k.float(), v.float(), w.float(), u.float(), 0)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


def test_bad_input_errors():
    k = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="one per channel"):
        biwkv(k, k, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="delta"):
        biwkv(k, k, torch.zeros(3), torch.zeros(3), delta=2)
    with pytest.raises(ValueError, match="unknown Bi-WKV backend"):
        biwkv(k, k, torch.zeros(3), torch.zeros(3), backend="nope")
