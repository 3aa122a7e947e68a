"""Triton Bi-WKV (forward and backward), exact for any decay sign and sequence length.

One program per (batch, block of channels) walks the sequence twice (left to right storing the log-scaled prefix
state, right to left combining it with the suffix state), as the official RWKV kernels do, so memory traffic is
O(T C) and nothing is materialised beyond three fp32 scratch rows per token. Every state is kept as a log-scale
``p`` plus scaled sums, so no exponent ever exceeds the running maximum (the fp32 closed form is limited to
``T |w| <~ 60``; this is not).

Backward (derived from ``y_t = N_t / D_t``): with ``x_t = -log D_t`` and ``g_t = dL/dy_t``

* ``dv_i = e^{k_i} [sum_{t != i} e^{-(|t-i| - delta) w + x_t} g_t] + e^{u + k_i + x_i} g_i``
* ``dk_i = v_i dv_i - (the same sum with g_t y_t)``
* ``du = sum_t g_t e^{u + k_t + x_t} (v_t - y_t)``
* ``dw = sum_t g_t (dN_t/dw - y_t dD_t/dw) / D_t``, with ``dN/dw, dD/dw`` carried forward-mode along the scans.

The two gradient sums are again bidirectional decayed scans (log-weights ``x_t``), done the same way. Inputs are
fp32/fp16/bf16 with fp32 accumulation. ``biwkv_triton`` is the autograd entry point; dispatch lives in
``diffusers_attn.kernels.biwkv.biwkv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["biwkv_triton", "supports"]

_NEG = -1.0e30  # log-scale of an empty state: exp(_NEG - anything finite) == 0


@triton.jit
def _biwkv_fwd_kernel(
    K, V, W, U, Y, LOGD, PP, PN, PD,
    T, C, stride_b, stride_t,
    DELTA: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    base = pid_b.to(tl.int64) * stride_b + offs
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=cm, other=0.0).to(tl.float32)

    # left to right: state_t = sum_{i<t} e^{k_i - (t-i) w} (v_i, 1) = e^p (n, d)
    p = tl.full([BLOCK_C], _NEG, tl.float32)
    n = tl.zeros([BLOCK_C], tl.float32)
    d = tl.zeros([BLOCK_C], tl.float32)
    for t in range(T):
        off = base + t * stride_t
        tl.store(PP + off, p, mask=cm)
        tl.store(PN + off, n, mask=cm)
        tl.store(PD + off, d, mask=cm)
        kt = tl.load(K + off, mask=cm, other=0.0).to(tl.float32)
        vt = tl.load(V + off, mask=cm, other=0.0).to(tl.float32)
        mx = tl.maximum(p, kt)
        e0 = tl.exp(p - mx)
        e1 = tl.exp(kt - mx)
        n = n * e0 + vt * e1
        d = d * e0 + e1
        p = mx - w

    # right to left: suffix state, combined with the stored prefix and the bonus term
    q = tl.full([BLOCK_C], _NEG, tl.float32)
    sn = tl.zeros([BLOCK_C], tl.float32)
    sd = tl.zeros([BLOCK_C], tl.float32)
    for i in range(T):
        t = T - 1 - i
        off = base + t * stride_t
        kt = tl.load(K + off, mask=cm, other=0.0).to(tl.float32)
        vt = tl.load(V + off, mask=cm, other=0.0).to(tl.float32)
        pp = tl.load(PP + off, mask=cm, other=_NEG)
        pn = tl.load(PN + off, mask=cm, other=0.0)
        pd = tl.load(PD + off, mask=cm, other=0.0)
        a_ = pp + DELTA * w
        b_ = q + DELTA * w
        c_ = u + kt
        m = tl.maximum(tl.maximum(a_, b_), c_)
        ea = tl.exp(a_ - m)
        eb = tl.exp(b_ - m)
        ec = tl.exp(c_ - m)
        num = pn * ea + sn * eb + vt * ec
        den = pd * ea + sd * eb + ec
        tl.store(Y + off, num / den, mask=cm)
        tl.store(LOGD + off, m + tl.log(den), mask=cm)
        mx = tl.maximum(q, kt)
        e0 = tl.exp(q - mx)
        e1 = tl.exp(kt - mx)
        sn = sn * e0 + vt * e1
        sd = sd * e0 + e1
        q = mx - w


@triton.jit
def _biwkv_bwd_kernel(
    K, V, W, U, Y, LOGD, GY, DK, DV, DW, DU, GR, GA, GB,
    T, C, stride_b, stride_t,
    DELTA: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    base = pid_b.to(tl.int64) * stride_b + offs
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    du = tl.zeros([BLOCK_C], tl.float32)

    # pass 1 (left to right): forward prefix with its w-derivative (dw), gradient prefix stored for pass 2
    p = tl.full([BLOCK_C], _NEG, tl.float32)
    n = tl.zeros([BLOCK_C], tl.float32)
    d = tl.zeros([BLOCK_C], tl.float32)
    dn = tl.zeros([BLOCK_C], tl.float32)
    dd = tl.zeros([BLOCK_C], tl.float32)
    r = tl.full([BLOCK_C], _NEG, tl.float32)
    ga = tl.zeros([BLOCK_C], tl.float32)
    gb = tl.zeros([BLOCK_C], tl.float32)
    for t in range(T):
        off = base + t * stride_t
        kt = tl.load(K + off, mask=cm, other=0.0).to(tl.float32)
        vt = tl.load(V + off, mask=cm, other=0.0).to(tl.float32)
        yt = tl.load(Y + off, mask=cm, other=0.0)
        ld = tl.load(LOGD + off, mask=cm, other=0.0)
        gt = tl.load(GY + off, mask=cm, other=0.0).to(tl.float32)
        coef = gt * tl.exp(p + DELTA * w - ld)
        dw += coef * ((DELTA * n + dn) - yt * (DELTA * d + dd))
        du += gt * tl.exp(u + kt - ld) * (vt - yt)
        tl.store(GR + off, r, mask=cm)
        tl.store(GA + off, ga, mask=cm)
        tl.store(GB + off, gb, mask=cm)
        # forward state update with forward-mode d/dw: S' = e^{-w}(S + e^k v), dS' = -S' + e^{-w} dS
        mx = tl.maximum(p, kt)
        e0 = tl.exp(p - mx)
        e1 = tl.exp(kt - mx)
        n = n * e0 + vt * e1
        d = d * e0 + e1
        dn = dn * e0 - n
        dd = dd * e0 - d
        p = mx - w
        # gradient state update with log-weight x_t = -log D_t
        xt = -ld
        mx = tl.maximum(r, xt)
        e0 = tl.exp(r - mx)
        e1 = tl.exp(xt - mx)
        ga = ga * e0 + gt * e1
        gb = gb * e0 + gt * yt * e1
        r = mx - w

    # pass 2 (right to left): forward suffix (dw), gradient suffix, and dk, dv
    q = tl.full([BLOCK_C], _NEG, tl.float32)
    sn = tl.zeros([BLOCK_C], tl.float32)
    sd = tl.zeros([BLOCK_C], tl.float32)
    dsn = tl.zeros([BLOCK_C], tl.float32)
    dsd = tl.zeros([BLOCK_C], tl.float32)
    rs = tl.full([BLOCK_C], _NEG, tl.float32)
    sa = tl.zeros([BLOCK_C], tl.float32)
    sb = tl.zeros([BLOCK_C], tl.float32)
    for i in range(T):
        t = T - 1 - i
        off = base + t * stride_t
        kt = tl.load(K + off, mask=cm, other=0.0).to(tl.float32)
        vt = tl.load(V + off, mask=cm, other=0.0).to(tl.float32)
        yt = tl.load(Y + off, mask=cm, other=0.0)
        ld = tl.load(LOGD + off, mask=cm, other=0.0)
        gt = tl.load(GY + off, mask=cm, other=0.0).to(tl.float32)
        coef = gt * tl.exp(q + DELTA * w - ld)
        dw += coef * ((DELTA * sn + dsn) - yt * (DELTA * sd + dsd))
        pr = tl.load(GR + off, mask=cm, other=_NEG)
        pa = tl.load(GA + off, mask=cm, other=0.0)
        pb = tl.load(GB + off, mask=cm, other=0.0)
        e_pre = tl.exp(kt + DELTA * w + pr)
        e_suf = tl.exp(kt + DELTA * w + rs)
        e_diag = tl.exp(u + kt - ld)
        dvt = e_pre * pa + e_suf * sa + e_diag * gt
        g2 = e_pre * pb + e_suf * sb + e_diag * gt * yt
        tl.store(DV + off, dvt, mask=cm)
        tl.store(DK + off, vt * dvt - g2, mask=cm)
        mx = tl.maximum(q, kt)
        e0 = tl.exp(q - mx)
        e1 = tl.exp(kt - mx)
        sn = sn * e0 + vt * e1
        sd = sd * e0 + e1
        dsn = dsn * e0 - sn
        dsd = dsd * e0 - sd
        q = mx - w
        xt = -ld
        mx = tl.maximum(rs, xt)
        e0 = tl.exp(rs - mx)
        e1 = tl.exp(xt - mx)
        sa = sa * e0 + gt * e1
        sb = sb * e0 + gt * yt * e1
        rs = mx - w

    out = pid_b.to(tl.int64) * C + offs
    tl.store(DW + out, dw, mask=cm)
    tl.store(DU + out, du, mask=cm)


_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot run these inputs (None when it can)."""
    if k.dtype not in _IO_DTYPES or v.dtype not in _IO_DTYPES:
        return f"dtype {k.dtype}/{v.dtype} (the kernel takes fp32, fp16 or bf16)"
    if not k.is_cuda and not _interpreting():
        return "CPU tensors outside the Triton interpreter (set TRITON_INTERPRET=1 to test on CPU)"
    return None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_c(C: int) -> int:
    return max(16, min(64, triton.next_power_of_2(C)))


class _BiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, w, u, delta: int):
        B, T, C = k.shape
        k = k.contiguous()
        v = v.contiguous()
        w32 = w.detach().float().contiguous()
        u32 = u.detach().float().contiguous()
        y = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
        logd = torch.empty_like(y)
        pp, pn, pd = (torch.empty_like(y) for _ in range(3))
        bc = _block_c(C)
        grid = (B, triton.cdiv(C, bc))
        _biwkv_fwd_kernel[grid](k, v, w32, u32, y, logd, pp, pn, pd, T, C, T * C, C, DELTA=delta, BLOCK_C=bc)
        ctx.save_for_backward(k, v, w32, u32, y, logd)
        ctx.delta = delta
        ctx.dtypes = (k.dtype, v.dtype, w.dtype, u.dtype)
        return y.to(v.dtype)

    @staticmethod
    def backward(ctx, gy):
        k, v, w32, u32, y, logd = ctx.saved_tensors
        B, T, C = k.shape
        gy = gy.contiguous()
        dk = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        gr, ga, gb = (torch.empty_like(dk) for _ in range(3))
        dw = torch.empty(B, C, device=k.device, dtype=torch.float32)
        du = torch.empty_like(dw)
        bc = _block_c(C)
        grid = (B, triton.cdiv(C, bc))
        _biwkv_bwd_kernel[grid](k, v, w32, u32, y, logd, gy, dk, dv, dw, du, gr, ga, gb, T, C, T * C, C,
                                DELTA=ctx.delta, BLOCK_C=bc)
        kd, vd, wd, ud = ctx.dtypes
        return dk.to(kd), dv.to(vd), dw.sum(0).to(wd), du.sum(0).to(ud), None


def biwkv_triton(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, *, delta: int = 0) -> torch.Tensor:
    """Bi-WKV through the Triton kernel (differentiable in k, v, w, u). Shapes as in ``biwkv``."""
    reason = supports(k, v)
    if reason is not None:
        raise ValueError(f"Bi-WKV Triton kernel cannot run this call: {reason}")
    if delta not in (0, 1):
        raise ValueError(f"delta must be 0 or 1, got {delta!r}")
    return _BiWKV.apply(k, v, w, u, int(delta))
