"""Bi-WKV Triton kernel (forward and backward, chunked) vs the O(T^2) reference; interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_biwkv import make

from diffusers_attn.kernels.biwkv import biwkv, biwkv_reference, select_biwkv_backend

triton = pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "T,C,delta,decay,normalise,dtype,tol,chunk",
    [
        (7, 5, 0, 5.0, True, torch.float32, 1e-5, None),  # one chunk
        (37, 20, 1, -3.0, True, torch.float32, 1e-5, 8),  # 5 chunks, the last one partial
        (30, 70, 0, 2.0, False, torch.float32, 2e-5, 7),  # unnormalised (|w| T ~ 60), two channel blocks
        (16, 8, 1, 1.0, True, torch.float16, 2e-3, 4),
    ],
)
def test_triton_forward_backward_match_reference(T, C, delta, decay, normalise, dtype, tol, chunk):
    k, v, w, u = make(2, T, C, decay, seed=T + C, dtype=torch.float32, normalise=normalise)
    g = torch.randn(2, T, C, generator=torch.Generator().manual_seed(1))
    ours = [x.to(DEV, dtype).clone().requires_grad_() for x in (k, v, w, u)]
    y = biwkv(*ours, delta=delta, backend="triton", chunk=chunk)
    assert y.dtype == dtype and y.shape == (2, T, C)
    (y.float() * g.to(DEV)).sum().backward()
    ref = [x.to(dtype).double().detach().clone().requires_grad_() for x in (k, v, w, u)]
    yr = biwkv_reference(*ref, delta)
    (yr * g.double()).sum().backward()
    assert rel_err(y.cpu(), yr.detach()) < tol
    for a, b, name in zip(ours, ref, "kvwu"):
        assert rel_err(a.grad.cpu(), b.grad) < 5 * tol, name


def test_triton_dispatch_rules():
    k = torch.randn(1, 4, 3)
    w = torch.zeros(3)
    assert select_biwkv_backend(k, w, "triton") == "triton"
    if not torch.cuda.is_available():
        assert select_biwkv_backend(k, w) in ("cumsum", "chunked")  # CPU never auto-picks the kernel
    else:
        assert select_biwkv_backend(k.cuda(), w.cuda()) == "triton"


def test_triton_extreme_decay_and_keys():
    """|w| T ~ 200 (the fp32 closed form would overflow) and keys spanning +-30: still exact and finite."""
    k, v, w, u = make(1, 50, 4, 4.0, seed=21, dtype=torch.float32, normalise=False)
    k = k * 10
    w[0] = -3.0  # far tokens dominate
    ours = [x.to(DEV).clone().requires_grad_() for x in (k, v, w, u)]
    y = biwkv(*ours, backend="triton", chunk=16)
    y.sum().backward()
    ref = [x.double().clone().requires_grad_() for x in (k, v, w, u)]
    yr = biwkv_reference(*ref)
    yr.sum().backward()
    assert rel_err(y.cpu(), yr.detach()) < 1e-5
    for a, b in zip(ours, ref):
        assert rel_err(a.grad.cpu(), b.grad) < 1e-4


# The ahead-of-time sm_90/sm_80 compile of these kernels lives in tests/test_triton_compile.py (all kernels).
