"""Bidirectional weighted key-value (Bi-WKV) scans: the token mixer of FEAT / Vision-RWKV.

For one channel of a sequence of length T, with per-channel decay ``w`` and bonus ``u`` and a distance offset
``delta`` in {0, 1}::

    wkv_t = [sum_{i != t} e^{-(|t-i| - delta) w + k_i} v_i + e^{u + k_t} v_t]
            / [sum_{i != t} e^{-(|t-i| - delta) w + k_i} + e^{u + k_t}]

Tensors are ``k, v`` (B, T, C) and ``w, u`` (C,); the output is (B, T, C) in ``v.dtype`` (sums in fp32, or fp64
for fp64 inputs). ``w`` is used as given: FEAT divides its decay by T before calling (see the FEAT model).

Implementations (all exact, none approximates):

* :func:`biwkv_reference`: the O(T^2) definition, a test oracle only.
* :func:`biwkv_cumsum`: O(T C) closed form with exclusive prefix/suffix cumsums centred at the middle of the
  sequence. Stable while ``T * |w|`` stays below ~60 (FEAT's T-normalised decay); :func:`biwkv` clamps to it.
* :func:`biwkv_chunked`: chunks of ``chunk`` tokens with an exact in-chunk decay matrix and log-scaled
  prefix/suffix states carried between chunks; stable for any ``w`` and any length (the processor's case).
* ``biwkv_triton`` (``biwkv_triton.py``): a Triton kernel (forward and backward) of the log-scaled recurrence.

:func:`biwkv` dispatches through the kernel registry (operation ``"biwkv"``): CUDA -> Triton when importable,
else ``cumsum`` when it is stable, else ``chunked``; ``backend=`` or ``DIFFATTN_KERNEL`` override as for the
attention kernels (``"torch"``: the stable PyTorch form; ``"reference"`` only when asked for).
"""

from __future__ import annotations

import torch

from . import registry
from .registry import BIWKV

__all__ = ["biwkv", "biwkv_reference", "biwkv_cumsum", "biwkv_chunked", "select_biwkv_backend", "CUMSUM_MAX_DECAY"]

#: |w| * T above which the global cumsum form could overflow fp32 (exponents reach ~|w| T + |w|).
CUMSUM_MAX_DECAY = 60.0


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _validate(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, delta: int) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"w and u must be ({C},) (one per channel); got {tuple(w.shape)} and {tuple(u.shape)}")
    if k.shape[1] < 1:
        raise ValueError("Bi-WKV needs a sequence of at least one token")
    if delta not in (0, 1):
        raise ValueError(f"delta must be 0 or 1, got {delta!r}")
    if not (k.is_floating_point() and v.is_floating_point() and w.is_floating_point() and u.is_floating_point()):
        raise ValueError("Bi-WKV inputs must be floating point")
    if not (k.device == v.device == w.device == u.device):
        raise ValueError("k, v, w, u must be on the same device")


def biwkv_reference(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, delta: int = 0) -> torch.Tensor:
    """The O(T^2) definition (materialises (B, T, T, C); small inputs only)."""
    _validate(k, v, w, u, delta)
    acc = _acc_dtype(v)
    k, v, w, u = (x.to(acc) for x in (k, v, w, u))
    T = k.shape[1]
    idx = torch.arange(T, device=k.device, dtype=acc)
    dist = (idx[:, None] - idx[None, :]).abs()  # (t, i)
    s = k[:, None, :, :] - (dist - delta)[None, :, :, None] * w  # (B, t, i, C)
    eye = torch.eye(T, dtype=torch.bool, device=k.device)[None, :, :, None]
    s = torch.where(eye, (u + k)[:, None, :, :].expand_as(s), s)
    p = torch.softmax(s, dim=2)
    return (p * v[:, None, :, :]).sum(2)


def biwkv_cumsum(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, delta: int = 0) -> torch.Tensor:
    """O(T C) closed form (differentiable by autograd). Requires ``T * |w|`` <= :data:`CUMSUM_MAX_DECAY`."""
    _validate(k, v, w, u, delta)
    out_dtype = v.dtype
    acc = _acc_dtype(v)
    k, v, w, u = (x.to(acc) for x in (k, v, w, u))
    B, T, C = k.shape
    m = k.amax(dim=1, keepdim=True).detach()  # cancels between numerator and denominator
    pos = torch.arange(T, device=k.device, dtype=acc)[None, :, None] - (T - 1) / 2  # centred index i - c
    km = k - m
    a = torch.exp(km + pos * w)
    b = torch.exp(km - pos * w)
    zero = k.new_zeros(B, 1, C)
    # exclusive prefix sums of a, a v and exclusive suffix sums of b, b v
    P = torch.cat([zero, torch.cumsum(a * v, 1)[:, :-1]], 1)
    Pd = torch.cat([zero, torch.cumsum(a, 1)[:, :-1]], 1)
    S = torch.cat([torch.flip(torch.cumsum(torch.flip(b * v, [1]), 1), [1])[:, 1:], zero], 1)
    Sd = torch.cat([torch.flip(torch.cumsum(torch.flip(b, [1]), 1), [1])[:, 1:], zero], 1)
    f = torch.exp(-(pos - delta) * w)
    g = torch.exp((pos + delta) * w)
    beta = torch.exp(u + km)
    num = f * P + g * S + beta * v
    den = f * Pd + g * Sd + beta
    return (num / den).to(out_dtype)


def biwkv_chunked(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, delta: int = 0, chunk: int = 64
) -> torch.Tensor:
    """Exact Bi-WKV for any decay: in-chunk decay matrix plus log-scaled prefix/suffix carries (autograd-able).

    The carry at a chunk boundary ``s`` is ``sum_{i<s} e^{k_i - (s-i) w} (v_i, 1)`` stored as a log-scale and
    scaled sums, so no exponent exceeds the running maximum whatever the sign or size of ``w * T``.
    """
    _validate(k, v, w, u, delta)
    out_dtype = v.dtype
    acc = _acc_dtype(v)
    k, v, w, u = (x.to(acc) for x in (k, v, w, u))
    B, T, C = k.shape
    L = max(1, min(int(chunk), T))
    n_chunks = (T + L - 1) // L
    pad = n_chunks * L - T
    neg = torch.finfo(acc).min / 4
    if pad:  # padded keys get a log-weight of ~-inf: they contribute nothing
        k = torch.cat([k, k.new_full((B, pad, C), neg)], 1)
        v = torch.cat([v, v.new_zeros(B, pad, C)], 1)
    kc = k.view(B, n_chunks, L, C)
    vc = v.view(B, n_chunks, L, C)
    j = torch.arange(L, device=k.device, dtype=acc)
    dist = j[:, None] - j[None, :]  # t - i inside a chunk
    lower = (dist > 0)[None, :, :, None]
    upper = (dist < 0)[None, :, :, None]
    dist_w = dist.abs()[None, :, :, None] * w  # (1, L, L, C)

    def carry(kx: torch.Tensor, vx: torch.Tensor, state):
        """Fold one chunk (in scan order, positions 0..L-1) into the carry at the position after it."""
        lw = kx - (L - j)[None, :, None] * w  # (B, L, C): e^{k_i - (L - i) w} relative to the chunk end
        if state is not None:
            p, n, d = state
            lw_all = torch.cat([lw, (p - L * w)[:, None]], 1)
        else:
            lw_all = lw
        p_new = lw_all.amax(1).detach()
        e = torch.exp(lw - p_new[:, None])
        n_new = (e * vx).sum(1)
        d_new = e.sum(1)
        if state is not None:
            e0 = torch.exp(p - L * w - p_new)
            n_new = n_new + e0 * n
            d_new = d_new + e0 * d
        return p_new, n_new, d_new

    # Suffix carries (scanning right to left): state entering chunk c from the right.
    suffix = [None] * n_chunks
    state = None
    for c in range(n_chunks - 1, -1, -1):
        suffix[c] = state
        state = carry(torch.flip(kc[:, c], [1]), torch.flip(vc[:, c], [1]), state)
    outs = []
    state = None
    for c in range(n_chunks):
        kx, vx = kc[:, c], vc[:, c]
        # log-weights (B, t, i, C) inside the chunk; the diagonal carries the bonus
        s = kx[:, None, :, :] - dist_w + delta * w
        diag = (u + kx)[:, :, None, :]
        eye = (dist == 0)[None, :, :, None]
        s = torch.where(eye, diag.expand_as(s), torch.where(lower | upper, s, torch.full_like(s, neg)))
        parts = [s]
        vals = [None]
        if state is not None:  # prefix carry at position t: e^{p - t w + delta w}
            p, n, d = state
            parts.append((p[:, None] - j[None, :, None] * w + delta * w)[:, :, None, :])
            vals.append((n, d))
        sf = suffix[c]
        if sf is not None:  # suffix carry at position t: e^{p - (L - 1 - t) w + delta w}
            p2, n2, d2 = sf
            parts.append((p2[:, None] - (L - 1 - j)[None, :, None] * w + delta * w)[:, :, None, :])
            vals.append((n2, d2))
        mx = torch.cat(parts, 2).amax(2, keepdim=True).detach()  # (B, L, 1, C)
        e = torch.exp(s - mx)
        num = (e * vx[:, None, :, :]).sum(2)
        den = e.sum(2)
        for lw, nv in zip(parts[1:], vals[1:]):
            ee = torch.exp(lw - mx)[:, :, 0, :]
            num = num + ee * nv[0][:, None, :]
            den = den + ee * nv[1][:, None, :]
        outs.append(num / den)
        state = carry(kx, vx, state)
    out = torch.cat(outs, 1)[:, :T]
    return out.to(out_dtype)


def _cumsum_stable(k: torch.Tensor, w: torch.Tensor) -> bool:
    span = float(w.detach().abs().max()) * k.shape[1] if w.numel() else 0.0
    return span <= CUMSUM_MAX_DECAY


def _load_triton() -> None:
    """the 'triton' backend needs the triton package (install the 'triton' extra)"""
    from . import biwkv_triton

    def run(k, v, w, u, *, delta, chunk):
        return biwkv_triton.biwkv_triton(k, v, w, u, delta=delta, chunk=chunk or biwkv_triton.DEFAULT_CHUNK)

    # selection sees k and w only; the launch re-checks v
    registry.register_backend(BIWKV, "triton", run, lambda k, w: biwkv_triton.supports(k, k),
                              auto=lambda k, w: k.is_cuda, order=0)


# Registry entry points: one call signature for every backend (``chunk`` None = the backend's default).
def _run_cumsum(k, v, w, u, *, delta, chunk):
    return biwkv_cumsum(k, v, w, u, delta)


def _run_chunked(k, v, w, u, *, delta, chunk):
    return biwkv_chunked(k, v, w, u, delta, chunk=chunk or 64)


def _run_reference(k, v, w, u, *, delta, chunk):
    return biwkv_reference(k, v, w, u, delta)


def _register_builtin() -> None:
    registry.register_backend(BIWKV, "cumsum", _run_cumsum, auto=_cumsum_stable, order=10)
    registry.register_backend(BIWKV, "chunked", _run_chunked, order=20)
    registry.register_backend(BIWKV, "reference", _run_reference, auto=lambda k, w: False, order=30)  # oracle
    registry.add_loader(BIWKV, _load_triton)


_register_builtin()


def select_biwkv_backend(k: torch.Tensor, w: torch.Tensor, backend: str | None = None) -> str:
    """The implementation :func:`biwkv` would run (``"cumsum"``, ``"chunked"``, ``"triton"``, ``"reference"`` or a
    registered one)."""
    return registry.select(BIWKV, (k, w), backend)


def biwkv(
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    delta: int = 0,
    backend: str | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Bi-WKV of ``k, v`` (B, T, C) with decay ``w`` and bonus ``u`` (C,): see the module docstring.

    ``chunk``: tokens per chunk of the chunked PyTorch form (default 64) or per program of the Triton kernel
    (default 256)."""
    _validate(k, v, w, u, delta)
    name = select_biwkv_backend(k, w, backend)
    return registry.backend_fn(BIWKV, name)(k, v, w, u, delta=delta, chunk=chunk)
