"""Triton Bi-WKV (forward and backward), exact for any decay sign and sequence length.

The sequence is cut into chunks of ``chunk`` tokens so long scans run in parallel (B x chunks x channel blocks
programs): a summary kernel folds each chunk into its log-scaled left-to-right and right-to-left states, a carry
kernel walks the chunk summaries to get every chunk's incoming prefix and suffix state, and the main kernel
rescans each chunk from those states (left to right storing the prefix state per token, right to left combining
it with the suffix state and the bonus term). Every state is a log-scale ``p`` plus scaled sums, so no exponent
exceeds the running maximum (the fp32 closed form is limited to ``T |w| <~ 60``; this is not). Memory traffic
is O(T C); nothing is materialised beyond three fp32 scratch rows per token.

Backward (derived from ``y_t = N_t / D_t``): with ``x_t = -log D_t`` and ``g_t = dL/dy_t``

* ``dv_i = e^{k_i} [sum_{t != i} e^{-(|t-i| - delta) w + x_t} g_t] + e^{u + k_i + x_i} g_i``
* ``dk_i = v_i dv_i - (the same sum with g_t y_t)``
* ``du = sum_t g_t e^{u + k_t + x_t} (v_t - y_t)``
* ``dw = sum_t g_t (dN_t/dw - y_t dD_t/dw) / D_t``, with ``dN/dw, dD/dw`` carried forward-mode along the scans
  (a chunk carry shifts a state S by L tokens as ``e^{-L w} S``, so its derivative becomes
  ``e^{-L w} (dS - L S)``).

The two gradient sums are again bidirectional decayed scans (log-weights ``x_t``), done the same way. Inputs are
fp32/fp16/bf16 with fp32 accumulation. ``biwkv_triton`` is the autograd entry point; dispatch lives in
``diffusers_attn.kernels.biwkv.biwkv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import launch_guard

__all__ = ["biwkv_triton", "supports"]

# Globals read inside @triton.jit must be constexpr (compiled Triton rejects plain Python globals).
_NEG_F = -1.0e30  # log-scale of an empty state: exp(_NEG - anything finite) == 0
_NEG = tl.constexpr(_NEG_F)
_BIG = tl.constexpr(1.0e30)  # log D of an absent token: x = -log D is "empty"


@triton.jit
def _fold(p, a, b, kt, va, vb, w):
    """Add one token (log-weight kt, values va, vb) to a state, then move it one token on."""
    mx = tl.maximum(p, kt)
    e0 = tl.exp(p - mx)
    e1 = tl.exp(kt - mx)
    return mx - w, a * e0 + va * e1, b * e0 + vb * e1, e0


@triton.jit
def _merge(p1, a1, b1, p2, a2, b2):
    m = tl.maximum(p1, p2)
    e1 = tl.exp(p1 - m)
    e2 = tl.exp(p2 - m)
    return m, a1 * e1 + a2 * e2, b1 * e1 + b2 * e2, e1, e2


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_summary_kernel(K, V, W, SUM, T, C, NC, L, stride_b, stride_t, fstride, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // NC
    t0 = (row % NC) * L
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    base = b.to(tl.int64) * stride_b + offs
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    p = tl.full([BLOCK_C], _NEG, tl.float32)
    n = tl.zeros([BLOCK_C], tl.float32)
    d = tl.zeros([BLOCK_C], tl.float32)
    for j in range(L):
        t = t0 + j
        m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
        kt = tl.load(K + base + t * stride_t, mask=m, other=_NEG).to(tl.float32)
        vt = tl.load(V + base + t * stride_t, mask=m, other=0.0).to(tl.float32)
        p, n, d, _e = _fold(p, n, d, kt, vt, 1.0, w)
    q = tl.full([BLOCK_C], _NEG, tl.float32)
    sn = tl.zeros([BLOCK_C], tl.float32)
    sd = tl.zeros([BLOCK_C], tl.float32)
    for i in range(L):
        t = t0 + L - 1 - i
        m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
        kt = tl.load(K + base + t * stride_t, mask=m, other=_NEG).to(tl.float32)
        vt = tl.load(V + base + t * stride_t, mask=m, other=0.0).to(tl.float32)
        q, sn, sd, _e = _fold(q, sn, sd, kt, vt, 1.0, w)
    o = SUM + row.to(tl.int64) * C + offs
    tl.store(o, p, mask=cm)
    tl.store(o + fstride, n, mask=cm)
    tl.store(o + 2 * fstride, d, mask=cm)
    tl.store(o + 3 * fstride, q, mask=cm)
    tl.store(o + 4 * fstride, sn, mask=cm)
    tl.store(o + 5 * fstride, sd, mask=cm)


@triton.jit
def _fwd_carry_kernel(SUM, INIT, W, C, NC, L, fstride, BLOCK_C: tl.constexpr):
    """INIT[row] = the state entering chunk ``row`` from the left (fields 0-2) and from the right (3-5)."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    p = tl.full([BLOCK_C], _NEG, tl.float32)
    n = tl.zeros([BLOCK_C], tl.float32)
    d = tl.zeros([BLOCK_C], tl.float32)
    for c in range(NC):
        o = (b * NC + c).to(tl.int64) * C + offs
        tl.store(INIT + o, p, mask=cm)
        tl.store(INIT + o + fstride, n, mask=cm)
        tl.store(INIT + o + 2 * fstride, d, mask=cm)
        fp = tl.load(SUM + o, mask=cm, other=_NEG)
        fn = tl.load(SUM + o + fstride, mask=cm, other=0.0)
        fd = tl.load(SUM + o + 2 * fstride, mask=cm, other=0.0)
        p, n, d, _e1, _e2 = _merge(p - L * w, n, d, fp, fn, fd)
    p = tl.full([BLOCK_C], _NEG, tl.float32)
    n = tl.zeros([BLOCK_C], tl.float32)
    d = tl.zeros([BLOCK_C], tl.float32)
    for i in range(NC):
        o = (b * NC + NC - 1 - i).to(tl.int64) * C + offs
        tl.store(INIT + o + 3 * fstride, p, mask=cm)
        tl.store(INIT + o + 4 * fstride, n, mask=cm)
        tl.store(INIT + o + 5 * fstride, d, mask=cm)
        fp = tl.load(SUM + o + 3 * fstride, mask=cm, other=_NEG)
        fn = tl.load(SUM + o + 4 * fstride, mask=cm, other=0.0)
        fd = tl.load(SUM + o + 5 * fstride, mask=cm, other=0.0)
        p, n, d, _e1, _e2 = _merge(p - L * w, n, d, fp, fn, fd)


@triton.jit
def _biwkv_fwd_kernel(
    K, V, W, U, Y, LOGD, PP, PN, PD, INIT,
    T, C, NC, L, stride_b, stride_t, fstride,
    DELTA: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // NC
    t0 = (row % NC) * L
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    base = b.to(tl.int64) * stride_b + offs
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=cm, other=0.0).to(tl.float32)
    io = INIT + row.to(tl.int64) * C + offs

    # left to right: state_t = sum_{i<t} e^{k_i - (t-i) w} (v_i, 1) = e^p (n, d)
    p = tl.load(io, mask=cm, other=_NEG)
    n = tl.load(io + fstride, mask=cm, other=0.0)
    d = tl.load(io + 2 * fstride, mask=cm, other=0.0)
    for j in range(L):
        t = t0 + j
        m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
        off = base + t * stride_t
        tl.store(PP + off, p, mask=m)
        tl.store(PN + off, n, mask=m)
        tl.store(PD + off, d, mask=m)
        kt = tl.load(K + off, mask=m, other=_NEG).to(tl.float32)
        vt = tl.load(V + off, mask=m, other=0.0).to(tl.float32)
        p, n, d, _e = _fold(p, n, d, kt, vt, 1.0, w)

    # right to left: suffix state, combined with the stored prefix and the bonus term
    q = tl.load(io + 3 * fstride, mask=cm, other=_NEG)
    sn = tl.load(io + 4 * fstride, mask=cm, other=0.0)
    sd = tl.load(io + 5 * fstride, mask=cm, other=0.0)
    for i in range(L):
        t = t0 + L - 1 - i
        m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
        off = base + t * stride_t
        kt = tl.load(K + off, mask=m, other=_NEG).to(tl.float32)
        vt = tl.load(V + off, mask=m, other=0.0).to(tl.float32)
        pp = tl.load(PP + off, mask=m, other=_NEG)
        pn = tl.load(PN + off, mask=m, other=0.0)
        pd = tl.load(PD + off, mask=m, other=0.0)
        a_ = pp + DELTA * w
        b_ = q + DELTA * w
        c_ = u + kt
        mx = tl.maximum(tl.maximum(a_, b_), c_)
        ea = tl.exp(a_ - mx)
        eb = tl.exp(b_ - mx)
        ec = tl.exp(c_ - mx)
        num = pn * ea + sn * eb + vt * ec
        den = pd * ea + sd * eb + ec
        tl.store(Y + off, num / den, mask=m)
        tl.store(LOGD + off, mx + tl.log(den), mask=m)
        q, sn, sd, _e = _fold(q, sn, sd, kt, vt, 1.0, w)


# ----------------------------------------------------------------------------------------------- backward
# 16 state fields per chunk row: left-to-right forward state (p, n, d, dn, dd) = 0-4 and gradient state
# (r, ga, gb) = 5-7; right-to-left forward state = 8-12 and gradient state = 13-15.


@triton.jit
def _bwd_summary_kernel(K, V, W, Y, LOGD, GY, SUM, T, C, NC, L, stride_b, stride_t, fstride,
                        BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // NC
    t0 = (row % NC) * L
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    base = b.to(tl.int64) * stride_b + offs
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    o = SUM + row.to(tl.int64) * C + offs
    for direction in tl.static_range(2):
        p = tl.full([BLOCK_C], _NEG, tl.float32)
        n = tl.zeros([BLOCK_C], tl.float32)
        d = tl.zeros([BLOCK_C], tl.float32)
        dn = tl.zeros([BLOCK_C], tl.float32)
        dd = tl.zeros([BLOCK_C], tl.float32)
        r = tl.full([BLOCK_C], _NEG, tl.float32)
        ga = tl.zeros([BLOCK_C], tl.float32)
        gb = tl.zeros([BLOCK_C], tl.float32)
        for j in range(L):
            t = t0 + j if direction == 0 else t0 + L - 1 - j
            m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
            off = base + t * stride_t
            kt = tl.load(K + off, mask=m, other=_NEG).to(tl.float32)
            vt = tl.load(V + off, mask=m, other=0.0).to(tl.float32)
            yt = tl.load(Y + off, mask=m, other=0.0)
            ld = tl.load(LOGD + off, mask=m, other=_BIG)
            gt = tl.load(GY + off, mask=m, other=0.0).to(tl.float32)
            p, n, d, e0 = _fold(p, n, d, kt, vt, 1.0, w)
            dn = dn * e0 - n
            dd = dd * e0 - d
            r, ga, gb, _e = _fold(r, ga, gb, -ld, gt, gt * yt, w)
        f = direction * 8 * fstride
        tl.store(o + f, p, mask=cm)
        tl.store(o + f + fstride, n, mask=cm)
        tl.store(o + f + 2 * fstride, d, mask=cm)
        tl.store(o + f + 3 * fstride, dn, mask=cm)
        tl.store(o + f + 4 * fstride, dd, mask=cm)
        tl.store(o + f + 5 * fstride, r, mask=cm)
        tl.store(o + f + 6 * fstride, ga, mask=cm)
        tl.store(o + f + 7 * fstride, gb, mask=cm)


@triton.jit
def _bwd_carry_kernel(SUM, INIT, W, C, NC, L, fstride, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    for direction in tl.static_range(2):
        f = direction * 8 * fstride
        p = tl.full([BLOCK_C], _NEG, tl.float32)
        n = tl.zeros([BLOCK_C], tl.float32)
        d = tl.zeros([BLOCK_C], tl.float32)
        dn = tl.zeros([BLOCK_C], tl.float32)
        dd = tl.zeros([BLOCK_C], tl.float32)
        r = tl.full([BLOCK_C], _NEG, tl.float32)
        ga = tl.zeros([BLOCK_C], tl.float32)
        gb = tl.zeros([BLOCK_C], tl.float32)
        for i in range(NC):
            c = i if direction == 0 else NC - 1 - i
            o = (b * NC + c).to(tl.int64) * C + offs + f
            tl.store(INIT + o, p, mask=cm)
            tl.store(INIT + o + fstride, n, mask=cm)
            tl.store(INIT + o + 2 * fstride, d, mask=cm)
            tl.store(INIT + o + 3 * fstride, dn, mask=cm)
            tl.store(INIT + o + 4 * fstride, dd, mask=cm)
            tl.store(INIT + o + 5 * fstride, r, mask=cm)
            tl.store(INIT + o + 6 * fstride, ga, mask=cm)
            tl.store(INIT + o + 7 * fstride, gb, mask=cm)
            sp = tl.load(SUM + o, mask=cm, other=_NEG)
            s_n = tl.load(SUM + o + fstride, mask=cm, other=0.0)
            s_d = tl.load(SUM + o + 2 * fstride, mask=cm, other=0.0)
            s_dn = tl.load(SUM + o + 3 * fstride, mask=cm, other=0.0)
            s_dd = tl.load(SUM + o + 4 * fstride, mask=cm, other=0.0)
            sr = tl.load(SUM + o + 5 * fstride, mask=cm, other=_NEG)
            s_ga = tl.load(SUM + o + 6 * fstride, mask=cm, other=0.0)
            s_gb = tl.load(SUM + o + 7 * fstride, mask=cm, other=0.0)
            # shifting by L tokens: S -> e^{-L w} S and dS -> e^{-L w} (dS - L S)
            dn1 = dn - L * n
            dd1 = dd - L * d
            p, n, d, e1, e2 = _merge(p - L * w, n, d, sp, s_n, s_d)
            dn = dn1 * e1 + s_dn * e2
            dd = dd1 * e1 + s_dd * e2
            r, ga, gb, _e1, _e2 = _merge(r - L * w, ga, gb, sr, s_ga, s_gb)


@triton.jit
def _biwkv_bwd_kernel(
    K, V, W, U, Y, LOGD, GY, DK, DV, DW, DU, GR, GA, GB, INIT,
    T, C, NC, L, stride_b, stride_t, fstride,
    DELTA: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // NC
    t0 = (row % NC) * L
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs < C
    base = b.to(tl.int64) * stride_b + offs
    w = tl.load(W + offs, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=cm, other=0.0).to(tl.float32)
    io = INIT + row.to(tl.int64) * C + offs
    dw = tl.zeros([BLOCK_C], tl.float32)
    du = tl.zeros([BLOCK_C], tl.float32)

    # pass 1 (left to right): forward prefix with its w-derivative (dw), gradient prefix stored for pass 2
    p = tl.load(io, mask=cm, other=_NEG)
    n = tl.load(io + fstride, mask=cm, other=0.0)
    d = tl.load(io + 2 * fstride, mask=cm, other=0.0)
    dn = tl.load(io + 3 * fstride, mask=cm, other=0.0)
    dd = tl.load(io + 4 * fstride, mask=cm, other=0.0)
    r = tl.load(io + 5 * fstride, mask=cm, other=_NEG)
    ga = tl.load(io + 6 * fstride, mask=cm, other=0.0)
    gb = tl.load(io + 7 * fstride, mask=cm, other=0.0)
    for j in range(L):
        t = t0 + j
        m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
        off = base + t * stride_t
        kt = tl.load(K + off, mask=m, other=_NEG).to(tl.float32)
        vt = tl.load(V + off, mask=m, other=0.0).to(tl.float32)
        yt = tl.load(Y + off, mask=m, other=0.0)
        ld = tl.load(LOGD + off, mask=m, other=_BIG)
        gt = tl.load(GY + off, mask=m, other=0.0).to(tl.float32)
        coef = gt * tl.exp(p + DELTA * w - ld)
        dw += coef * ((DELTA * n + dn) - yt * (DELTA * d + dd))
        du += gt * tl.exp(u + kt - ld) * (vt - yt)
        tl.store(GR + off, r, mask=m)
        tl.store(GA + off, ga, mask=m)
        tl.store(GB + off, gb, mask=m)
        # forward state with forward-mode d/dw: S' = e^{-w}(S + e^k v), dS' = -S' + e^{-w} dS
        p, n, d, e0 = _fold(p, n, d, kt, vt, 1.0, w)
        dn = dn * e0 - n
        dd = dd * e0 - d
        r, ga, gb, _e = _fold(r, ga, gb, -ld, gt, gt * yt, w)

    # pass 2 (right to left): forward suffix (dw), gradient suffix, and dk, dv
    f = 8 * fstride
    q = tl.load(io + f, mask=cm, other=_NEG)
    sn = tl.load(io + f + fstride, mask=cm, other=0.0)
    sd = tl.load(io + f + 2 * fstride, mask=cm, other=0.0)
    dsn = tl.load(io + f + 3 * fstride, mask=cm, other=0.0)
    dsd = tl.load(io + f + 4 * fstride, mask=cm, other=0.0)
    rs = tl.load(io + f + 5 * fstride, mask=cm, other=_NEG)
    sa = tl.load(io + f + 6 * fstride, mask=cm, other=0.0)
    sb = tl.load(io + f + 7 * fstride, mask=cm, other=0.0)
    for i in range(L):
        t = t0 + L - 1 - i
        m = cm & ((offs * 0 + t) < T)  # block-shaped: the interpreter rejects scalar-broadcast masks
        off = base + t * stride_t
        kt = tl.load(K + off, mask=m, other=_NEG).to(tl.float32)
        vt = tl.load(V + off, mask=m, other=0.0).to(tl.float32)
        yt = tl.load(Y + off, mask=m, other=0.0)
        ld = tl.load(LOGD + off, mask=m, other=_BIG)
        gt = tl.load(GY + off, mask=m, other=0.0).to(tl.float32)
        coef = gt * tl.exp(q + DELTA * w - ld)
        dw += coef * ((DELTA * sn + dsn) - yt * (DELTA * sd + dsd))
        pr = tl.load(GR + off, mask=m, other=_NEG)
        pa = tl.load(GA + off, mask=m, other=0.0)
        pb = tl.load(GB + off, mask=m, other=0.0)
        e_pre = tl.exp(kt + DELTA * w + pr)
        e_suf = tl.exp(kt + DELTA * w + rs)
        e_diag = tl.exp(u + kt - ld)
        dvt = e_pre * pa + e_suf * sa + e_diag * gt
        g2 = e_pre * pb + e_suf * sb + e_diag * gt * yt
        tl.store(DV + off, dvt, mask=m)
        tl.store(DK + off, vt * dvt - g2, mask=m)
        q, sn, sd, e0 = _fold(q, sn, sd, kt, vt, 1.0, w)
        dsn = dsn * e0 - sn
        dsd = dsd * e0 - sd
        rs, sa, sb, _e = _fold(rs, sa, sb, -ld, gt, gt * yt, w)

    out = row.to(tl.int64) * C + offs
    tl.store(DW + out, dw, mask=cm)
    tl.store(DU + out, du, mask=cm)


_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One program holds <= 64 channels and walks its tokens serially (latency-bound): few warps per program let more
# programs share an SM. Untuned (no GPU has run this yet).
_WARPS = 2
DEFAULT_CHUNK = 256


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


def _empty_init(nf: int, rows: int, C: int, p_fields: tuple[int, ...], device) -> torch.Tensor:
    init = torch.zeros(nf, rows, C, device=device, dtype=torch.float32)
    init[list(p_fields)] = _NEG_F
    return init


class _BiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, w, u, delta: int, chunk: int):
        with launch_guard(k):
            return _BiWKV._forward(ctx, k, v, w, u, delta, chunk)

    @staticmethod
    def backward(ctx, gy):
        # autograd may run this on another thread, whose current device is not k's
        with launch_guard(gy):
            return _BiWKV._backward(ctx, gy)

    @staticmethod
    def _forward(ctx, k, v, w, u, delta: int, chunk: int):
        B, T, C = k.shape
        k = k.contiguous()
        v = v.contiguous()
        w32 = w.detach().float().contiguous()
        u32 = u.detach().float().contiguous()
        L = min(chunk, T)
        NC = triton.cdiv(T, L)
        y = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
        logd = torch.empty_like(y)
        pp, pn, pd = (torch.empty_like(y) for _ in range(3))
        bc = _block_c(C)
        nblk = triton.cdiv(C, bc)
        rows = B * NC
        fs = rows * C
        if NC == 1:
            init = _empty_init(6, rows, C, (0, 3), k.device)
        else:
            summ = torch.empty(6, rows, C, device=k.device, dtype=torch.float32)
            _fwd_summary_kernel[(rows, nblk)](k, v, w32, summ, T, C, NC, L, T * C, C, fs, BLOCK_C=bc,
                                              num_warps=_WARPS)
            init = torch.empty_like(summ)
            _fwd_carry_kernel[(B, nblk)](summ, init, w32, C, NC, L, fs, BLOCK_C=bc, num_warps=_WARPS)
        _biwkv_fwd_kernel[(rows, nblk)](k, v, w32, u32, y, logd, pp, pn, pd, init, T, C, NC, L, T * C, C, fs,
                                        DELTA=delta, BLOCK_C=bc, num_warps=_WARPS)
        ctx.save_for_backward(k, v, w32, u32, y, logd)
        ctx.delta, ctx.chunk = delta, chunk
        ctx.dtypes = (k.dtype, v.dtype, w.dtype, u.dtype)
        return y.to(v.dtype)

    @staticmethod
    def _backward(ctx, gy):
        k, v, w32, u32, y, logd = ctx.saved_tensors
        B, T, C = k.shape
        L = min(ctx.chunk, T)
        NC = triton.cdiv(T, L)
        gy = gy.contiguous()
        dk = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        gr, ga, gb = (torch.empty_like(dk) for _ in range(3))
        rows = B * NC
        fs = rows * C
        dw = torch.empty(rows, C, device=k.device, dtype=torch.float32)
        du = torch.empty_like(dw)
        bc = _block_c(C)
        nblk = triton.cdiv(C, bc)
        if NC == 1:
            init = _empty_init(16, rows, C, (0, 5, 8, 13), k.device)
        else:
            summ = torch.empty(16, rows, C, device=k.device, dtype=torch.float32)
            _bwd_summary_kernel[(rows, nblk)](k, v, w32, y, logd, gy, summ, T, C, NC, L, T * C, C, fs, BLOCK_C=bc,
                                              num_warps=_WARPS)
            init = torch.empty_like(summ)
            _bwd_carry_kernel[(B, nblk)](summ, init, w32, C, NC, L, fs, BLOCK_C=bc, num_warps=_WARPS)
        _biwkv_bwd_kernel[(rows, nblk)](k, v, w32, u32, y, logd, gy, dk, dv, dw, du, gr, ga, gb, init,
                                        T, C, NC, L, T * C, C, fs, DELTA=ctx.delta, BLOCK_C=bc, num_warps=_WARPS)
        kd, vd, wd, ud = ctx.dtypes
        return dk.to(kd), dv.to(vd), dw.sum(0).to(wd), du.sum(0).to(ud), None, None


def biwkv_triton(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, *, delta: int = 0, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Bi-WKV through the Triton kernel (differentiable in k, v, w, u). Shapes as in ``biwkv``; ``chunk`` is the
    number of tokens one program scans (sequences longer than it are split and carried between chunks)."""
    reason = supports(k, v)
    if reason is not None:
        raise ValueError(f"Bi-WKV Triton kernel cannot run this call: {reason}")
    if delta not in (0, 1):
        raise ValueError(f"delta must be 0 or 1, got {delta!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return _BiWKV.apply(k, v, w, u, int(delta), chunk)
