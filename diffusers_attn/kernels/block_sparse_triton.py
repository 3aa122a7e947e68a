"""Triton forward kernel for block-sparse flash attention (the ``"triton"`` backend of ``block_sparse_attention``).

One program computes one ``BLOCK_M`` tile of query rows for one (batch, head): it reads that tile's key-block list
(``kv_indices``/``kv_counts`` at the list granularity ``block_m``/``block_n``; kernel tiles divide them) and streams
only the listed key blocks with an online softmax in fp32 (exp2 domain). The list is ascending, so it splits into
full blocks, which take a loop with no masking at all (the scale folded into one FMA inside exp2: the dense flash
loop plus one scalar index load per block), then the boundary block(s), which take a masked loop (key tail, the
block straddling padded text, and for a key padding mask that is not a contiguous tail, every block past its first
padded key, with the mask loaded: still exact), then blocks with no valid key, which are skipped. Key padding
reaches the kernel as per-batch key bounds computed on the device (``key_bounds``). Addresses are a 64-bit scalar
base per tile plus 32-bit in-tile offsets (``supports`` refuses strides where those could overflow). Output in the
input dtype plus, optionally, the natural-log LSE; a row that sees no valid key gets zeros and ``lse = -inf``.
``benchmarks/kernel_sass.py`` counts the compiled loops against a dense flash loop.

* Inputs: fp16 / bf16 / fp32 (fp32 uses IEEE dot products), strided views (no copies), head_dim up to 256 (padded
  in registers to the next power of two, so 72 and 96 work), Nq != Nk, any N.
* Compact tables: with ``head_table`` (int32 (B, H)), ``kv_indices``/``kv_counts`` are per-*pattern* tables
  ``[P, M, K_max]``/``[P, M]`` and each (b, h) reads row ``head_table[b, h]``; this is how RainFusion runs all of
  its heads in one launch without expanding lists per head.

Imported lazily (never at package import); on CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .memo import TensorMemo

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _tile_scores(q, k_base, kpm_base, s_kn, s_kd, s_pn, offs_n, offs_d, NK, HEAD_DIM, qk_scale,
                 EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr, IEEE: tl.constexpr):
    """Scores of a query tile against the key tile ``offs_n`` times ``qk_scale`` (log2 domain), -inf on tails
    and padded keys; also the key-validity vector. Shared by the attention and the probe kernels."""
    n_ok = offs_n < NK
    if HAS_KPM:
        pad = tl.load(kpm_base + offs_n * s_pn, mask=n_ok, other=0)
        n_ok = n_ok & (pad != 0)
    if EVEN_D:
        kt_mask = n_ok[None, :]
    else:
        kt_mask = n_ok[None, :] & (offs_d[:, None] < HEAD_DIM)
    kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, mask=kt_mask, other=0.0)
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    return tl.where(n_ok[None, :], qk * qk_scale, float("-inf")), n_ok


@triton.jit
def _lower_bound(idx_base, s_ij, cnt, x):
    """Number of entries of the ascending list ``idx_base[0:cnt]`` that are below ``x`` (binary search)."""
    lo = cnt * 0
    hi = cnt
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(idx_base + mid * s_ij) < x
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, O, LSE, IDX, CNT, HEADTAB, KPM, KBND,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_lb, s_lh, s_lm,
    s_ib, s_ih, s_im, s_ij,
    s_cb, s_ch, s_cm,
    s_tb, s_th,
    s_pb, s_pn,
    H, NQ, NK, HEAD_DIM, qk_scale,
    LIST_BM: tl.constexpr, LIST_BN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_LSE: tl.constexpr, USE_TABLE: tl.constexpr,
    IEEE: tl.constexpr, NEG_SCALE: tl.constexpr, MASKED_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row0 = pid_m * BLOCK_M
    list_m = row0 // LIST_BM

    # Addresses: 64-bit scalar bases per (batch, head, tile) plus 32-bit in-tile offsets (hoisted out of the
    # loops). Row offsets alone overflow int32 from ~233k tokens with fused-QKV strides; in-tile offsets cannot
    # (``supports`` refuses strides where they would).
    loc_m = tl.arange(0, BLOCK_M)
    loc_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = loc_m < NQ - row0
    if EVEN_D:
        q_mask = m_ok[:, None]
    else:
        q_mask = m_ok[:, None] & d_ok[None, :]
    q_base = Q + b * s_qb + h * s_qh + row0.to(tl.int64) * s_qm
    q = tl.load(q_base + loc_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    if NEG_SCALE:  # keeps qk_scale > 0, which the hot loop's max-then-scale relies on
        q = -q

    if USE_TABLE:
        pat = tl.load(HEADTAB + b * s_tb + h * s_th).to(tl.int64)
        idx_base = IDX + pat * s_ib + list_m * s_im
        cnt = tl.load(CNT + pat * s_cb + list_m * s_cm)
    else:
        idx_base = IDX + b * s_ib + h * s_ih + list_m * s_im
        cnt = tl.load(CNT + b * s_cb + h * s_ch + list_m * s_cm)

    # Keys [0, kv_full) are all valid, keys >= kv_end all invalid (tails, padded text). The list is ascending, so
    # it splits into full blocks (no masking at all), then the boundary block(s) (masked), then blocks with no
    # valid key (skipped: they would add exp2(-inf) = 0).
    if HAS_KPM:
        kv_full = tl.minimum(tl.load(KBND + b * 2), NK)
        kv_end = tl.minimum(tl.load(KBND + b * 2 + 1), NK)
        n_end = _lower_bound(idx_base, s_ij, cnt, tl.cdiv(kv_end, LIST_BN))
    else:
        kv_full = NK
        kv_end = NK
        n_end = cnt
    n_full = _lower_bound(idx_base, s_ij, n_end, kv_full // LIST_BN)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if EVEN_D:
        kt_off = offs_d[:, None] * s_kd + loc_n[None, :] * s_kn
    else:  # padded head_dim lanes of a tile are clamped to the last real one (in bounds) and zeroed in q
        kt_off = tl.minimum(offs_d, HEAD_DIM - 1)[:, None] * s_kd + loc_n[None, :] * s_kn
    v_off = loc_n[:, None] * s_vn + offs_d[None, :] * s_vd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    SUB: tl.constexpr = LIST_BN // BLOCK_N

    # Hot loop: full key tiles. Every score is finite, so after the first tile m_new is finite and the scale
    # folds into one FMA inside exp2 (the Triton-tutorial flash loop plus one scalar index load per block).
    # The block index is fetched one iteration ahead, so the K/V loads do not depend on a load of the same
    # iteration and the pipeliner gives them all num_stages buffers (2 instead of 3 otherwise).
    kb_next = tl.load(idx_base)  # in bounds: K_max >= 1
    for j in range(n_full):
        kb = kb_next.to(tl.int64)
        kb_next = tl.load(idx_base + tl.minimum(j + 1, n_full - 1) * s_ij)
        for s in tl.static_range(SUB):
            n0 = kb * LIST_BN + s * BLOCK_N
            kt = tl.load(k_base + n0 * s_kn + kt_off)
            if IEEE:
                qk = tl.dot(q, kt, input_precision="ieee")
            else:
                qk = tl.dot(q, kt)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if EVEN_D:
                v = tl.load(v_base + n0 * s_vn + v_off)
            else:
                v = tl.load(v_base + n0 * s_vn + v_off, mask=d_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    # Masked loop: the boundary tile(s) of the row (the key tail, the block straddling the end of the valid
    # keys, and with a non-tail key padding mask every block past its first padded key, whose mask it loads).
    # About one iteration per row, so its pipeline depth is chosen for register pressure (see the wrapper).
    for j in tl.range(n_full, n_end, num_stages=MASKED_STAGES):
        kb = tl.load(idx_base + j * s_ij).to(tl.int64)
        for s in tl.static_range(SUB):
            n0 = kb * LIST_BN + s * BLOCK_N
            n_ok = loc_n < (kv_end - n0).to(tl.int32)  # |kv_end - n0| <= NK
            if HAS_KPM:
                pad = tl.load(KPM + b * s_pb + n0 * s_pn + loc_n * s_pn, mask=n_ok, other=0)
                n_ok = n_ok & (pad != 0)
            if EVEN_D:
                kt_mask = n_ok[None, :]
                v_mask = n_ok[:, None]
            else:
                kt_mask = n_ok[None, :] & d_ok[:, None]
                v_mask = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_base + n0 * s_kn + kt_off, mask=kt_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q, kt, input_precision="ieee")
            else:
                qk = tl.dot(q, kt)
            qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n0 * s_vn + v_off, mask=v_mask, other=0.0)
            if IEEE:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_base = O + b * s_ob + h * s_oh + row0.to(tl.int64) * s_om
    tl.store(o_base + loc_m[:, None] * s_om + offs_d[None, :] * s_od, out.to(O.dtype.element_ty), mask=q_mask)
    if HAS_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        l_base = LSE + b * s_lb + h * s_lh + row0.to(tl.int64) * s_lm
        tl.store(l_base + loc_m * s_lm, lse, mask=m_ok)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_dtype_problem(q: torch.Tensor) -> str | None:
    """Why no Triton kernel of this package can take ``q`` (its device or dtype), else None: the checks every
    kernel's ``supports`` starts with."""
    if q.device.type != "cuda" and not interpreter_enabled():
        return f"tensors on {q.device.type} (the Triton kernel needs CUDA, or TRITON_INTERPRET=1 for tests)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    return None


def _pow2_divisor(limit: int, of: int) -> int:
    """Largest power of two <= limit dividing ``of`` (0 if below 16)."""
    t = 1 << (max(limit, 1).bit_length() - 1)
    while t >= 16 and of % t:
        t //= 2
    return t if t >= 16 else 0


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device``; None off CUDA (the interpreter). The one place the launch wrappers
    ask for it, so the ahead-of-time compile check (tests/_triton_compile_check.py) can stand in a GPU's."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


# Compute capabilities with 99 KiB of shared memory per block (consumer Ampere/Ada/Blackwell, L4/L40S).
_SMALL_SMEM_CAPS = frozenset({(8, 6), (8, 7), (8, 9), (12, 0), (12, 1)})


def tile_config(
    head_dim: int, block_m: int, block_n: int, device: torch.device, elem_size: int = 2
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this call (``elem_size``: bytes per q/k/v element). A small
    table, not autotuned: GPU timings of alternatives come from ``benchmarks/attention_kernels.py --sweep-tiles``.
    Shared-memory sizes quoted below are triton 3.9's compiled sizes (tests/_triton_compile_check.py)."""
    cap = device_capability(device)
    if cap is None:  # interpreter: small tiles keep the tests fast
        bm_t, bn_t, warps, stages = 16, 16, 1, 1
    elif head_dim <= 64:
        bm_t, bn_t, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        bm_t, bn_t, warps, stages = 128, 64, 8, 3
    else:
        bm_t, bn_t, warps, stages = 64, 32, 8, 2
    if cap is not None and cap[0] < 8:
        # pre-Ampere parts have far less shared memory per SM: halve the query tile, no deep pipelining
        bm_t, stages = min(bm_t, 64), min(stages, 2)
    elif cap is not None and cap in _SMALL_SMEM_CAPS:
        # 99 KiB per block (RTX 30xx/40xx, L4/L40S, RTX 50xx): fp16 D=256 at 2 stages takes 100 KiB and fp32 D=128
        # at 64x64x2 115 KiB (triton 3.9, sm_89); one stage, and a 32-row query tile for fp32 D=256, fit.
        if elem_size >= 4 and head_dim > 64:
            bm_t, stages = (64 if head_dim <= 128 else 32), 1
        elif head_dim > 128:
            stages = 1
        elif head_dim > 64:
            # 16-bit D=128 at 128x64x3 takes 96 KiB with triton 3.9 but 128 KiB with 3.6 (the GPU image's and
            # torch 2.10/2.11's version; launch fails with OutOfResources): two stages take 96 KiB there
            stages = 2
    elif cap is not None and cap[0] < 9 and elem_size >= 4 and head_dim > 64:
        # fp32 tiles need twice the shared memory: the fp16 table's D=128 (128x64, 3 stages) takes 225 KiB and
        # D=256 (64x32, 2 stages) 200 KiB, over Ampere's 163 KiB (launch fails with OutOfResources); these take
        # 112 KiB and 104 KiB. Hopper's 227 KiB holds the fp16 table.
        bm_t, stages = min(bm_t, 64), (2 if head_dim <= 128 else 1)
    return _pow2_divisor(bm_t, block_m), _pow2_divisor(bn_t, block_n), warps, stages


# In-tile offsets are 32-bit (the 64-bit part is one scalar base per tile): rows of a tile times the row stride plus
# the padded head_dim times the element stride must stay below 2**31 elements.
_MAX_TILE_ROWS, _INT32_MAX = 128, 2**31 - 1


def _stride_problem(t: torch.Tensor, name: str) -> str | None:
    s_n, s_d = t.stride(2), t.stride(3)
    if _MAX_TILE_ROWS * s_n + 256 * s_d > _INT32_MAX:
        return (f"{name} strides (token {s_n}, channel {s_d}) (supported: 128 * token stride + 256 * channel "
                f"stride < 2**31 elements; make {name} contiguous)")
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> str | None:
    """None if the Triton kernel can run this call, else the reason."""
    why = device_dtype_problem(q)
    if why:
        return why
    if q.shape[-1] > 256 or v.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} / value dim {v.shape[-1]} (supported: equal, at most 256)"
    if block_m % 16 or block_n % 16:
        return f"block sizes {block_m}x{block_n} (supported: multiples of 16)"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        why = _stride_problem(t, name)
        if why:
            return why
    return None


def launch_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for a launch: Triton launches on the current device, so tensors on ``cuda:1``
    with device 0 current would otherwise run on the wrong GPU. A no-op off CUDA (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_KEY_BOUNDS_MEMO = TensorMemo(size=4)  # a call may use a few masks (the key mask, the textural gathered one)


def key_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 (B, 2) per batch row of a bool (B, Nk) key mask (True = valid): the first padded key and the last
    valid key + 1 (equal when the padding is a contiguous tail, as padded text is). Computed on the mask's device,
    no host sync; every layer of a forward passes the same mask, so the result is reused while it is unchanged."""
    return _KEY_BOUNDS_MEMO.get(key_padding_mask, lambda: _key_bounds(key_padding_mask))


def _key_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    n = key_padding_mask.shape[-1]
    ar = torch.arange(n, device=key_padding_mask.device, dtype=torch.int32)
    first_pad = torch.where(key_padding_mask, n, ar).amin(-1)
    end = torch.where(key_padding_mask, ar + 1, 0).amax(-1)
    return torch.stack((first_pad, end), 1).to(torch.int32)


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    head_table: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel (inputs validated by the dispatcher). ``config`` overrides the tile table (benchmarks)."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    bm_t, bn_t, warps, stages = config or tile_config(D, block_m, block_n, q.device, q.element_size())
    if not bm_t or not bn_t or block_m % bm_t or block_n % bn_t:
        raise ValueError(f"tile {bm_t}x{bn_t} must divide the list blocks {block_m}x{block_n} and be >= 16")
    block_d = max(16, triton.next_power_of_2(D))
    out = torch.empty(B, H, n_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, n_q, dtype=torch.float32, device=q.device) if return_lse else out
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        kbnd = key_bounds(key_padding_mask)
    else:
        kpm = kbnd = out
    if head_table is not None:
        s_i = (kv_indices.stride(0), 0, kv_indices.stride(1), kv_indices.stride(2))
        s_c = (kv_counts.stride(0), 0, kv_counts.stride(1))
        s_t = (head_table.stride(0), head_table.stride(1))
        tab = head_table
    else:
        s_i = kv_indices.stride()
        s_c = kv_counts.stride()
        s_t = (0, 0)
        tab = kv_counts
    grid = (triton.cdiv(n_q, bm_t), B * H)
    # Boundary loop not pipelined on Hopper: that frees registers (no spills; compiled-code counts of
    # benchmarks/kernel_sass.py, triton 3.9); on Ampere the same change made ptxas spill inside the hot loop.
    cap = device_capability(q.device)
    masked_stages = 1 if cap is not None and cap[0] >= 9 else stages
    with launch_guard(q):
        _bsa_fwd_kernel[grid](
            q, k, v, out, lse, kv_indices, kv_counts, tab, kpm, kbnd,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *(lse.stride() if return_lse else (0, 0, 0)),
            *s_i, *s_c, *s_t,
            *(kpm.stride() if key_padding_mask is not None else (0, 0)),
            H, n_q, n_k, D, abs(scale) * _LOG2E,
            LIST_BM=block_m, LIST_BN=block_n, BLOCK_M=bm_t, BLOCK_N=bn_t, BLOCK_D=block_d,
            EVEN_D=block_d == D, HAS_KPM=key_padding_mask is not None, HAS_LSE=return_lse,
            USE_TABLE=head_table is not None, IEEE=q.dtype == torch.float32, NEG_SCALE=scale < 0,
            MASKED_STAGES=masked_stages,
            num_warps=warps, num_stages=stages, enable_fp_fusion=True,  # explicit: triton 3.10 turns the default off
        )
    if return_lse:
        return out, lse
    return out
