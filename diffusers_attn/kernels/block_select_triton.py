"""Triton kernels for ``block_topk_select`` (semantics and PyTorch reference in :mod:`.block_select`).

Done with PyTorch the selection is ~40 small device ops per call (pooling, scores, masking, top-k, lists, stats),
each a launch and, on the host, a dispatch. Here it is three launches and four allocations:

* ``_block_pool_kernel`` (run once for q, once for k): one program per (block, batch x head) sums its tokens in
  fp32 (padded keys excluded) and writes the mean (IEEE division, as the reference) into one (B, H, M + K, D)
  buffer: q blocks first, then k blocks.
* ``_block_select_kernel``: one program per ``ROWS`` query blocks of a (batch, head). Phase 1 computes the rows'
  scores against every key block with ``tl.dot`` (IEEE fp32, no FMA contraction of ``* scale + bias``, so a score
  has the reference's rounding when the dot is exact) and writes them to a scratch buffer. Phase 2 takes one row
  at a time as a 1-D vector: the ``topk``-th largest candidate score by a 32-step radix select over an
  order-preserving uint32 image of the fp32 scores (-0.0 folded onto +0.0), ties at that score to the lowest
  block indices (a prefix count), the list by a prefix sum, the softmax mass and pair counts of the listed
  blocks, accumulated over the program's rows in fp64. One (B, H, programs, 4) fp64 tensor holds the partial
  stats; its sum over the programs is the only PyTorch op after the kernels.

Memory: the pooled means and the (B, H, M, K) fp32 scores (e.g. 166 MB at HunyuanVideo 720p, 24 heads, 931 x 1861
blocks; the PyTorch path holds several tensors of that size). Inputs fp16 / bf16 / fp32 (any strides), head_dim up
to 256, up to 8192 key blocks. On CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_sparse_triton as bst
from .block_format import num_blocks
from .block_select import KeyBlocks
from .block_sparse_triton import launch_guard

MAX_KEY_BLOCKS = 8192


@triton.jit
def _block_pool_kernel(
    X, W, OUT,
    s_xb, s_xh, s_xn, s_xd,
    s_wb, s_wn,
    s_ob, s_oh, s_on, s_od,
    H, N, D, BLOCK, row0,
    TILE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
):
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = blk.to(tl.int64) * BLOCK
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([TILE], dtype=tl.float32)
    x_base = X + b * s_xb + h * s_xh
    for t in range(0, BLOCK, TILE):
        offs = t + tl.arange(0, TILE)
        offs_n = start + offs
        ok = (offs < BLOCK) & (offs_n < N)
        if HAS_W:
            w = tl.load(W + b * s_wb + offs_n * s_wn, mask=ok, other=0)
            ok = ok & (w != 0)
        x = tl.load(x_base + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd, mask=ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
        cnt += ok.to(tl.float32)
    n = tl.maximum(tl.sum(cnt, 0), 1.0)
    mean = tl.math.div_rn(acc, tl.zeros([BLOCK_D], dtype=tl.float32) + n)
    tl.store(OUT + b * s_ob + h * s_oh + (row0 + blk) * s_on + offs_d * s_od, mean, mask=d_ok)


@triton.jit
def _block_select_kernel(
    P, L, FORCED, KCNT, KBIAS, KTOT, ROWW, COLW, IDX, CNT, STATS,
    s_pb, s_ph, s_pn, s_pd,
    s_lb, s_lh, s_lm,
    s_fm, s_fk,
    s_kb, s_tb,
    s_ib, s_ih, s_im, s_ik,
    s_cb, s_ch, s_cm,
    s_sb, s_sh, s_sp,
    H, M, K, D, TOPK, K_MAX, scale,
    ROWS: tl.constexpr, KC: tl.constexpr, K_PAD: tl.constexpr, KM_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    p_base = P + b * s_pb + h * s_ph
    l_base = L + b * s_lb + h * s_lh

    # Phase 1: the rows' scores against every key block, into the scratch buffer.
    qh = tl.load(p_base + rows[:, None] * s_pn + offs_d[None, :] * s_pd, mask=r_ok[:, None] & d_ok[None, :],
                 other=0.0)
    for kc in range(0, K, KC):
        offs_k = kc + tl.arange(0, KC)
        k_ok = offs_k < K
        kh = tl.load(p_base + (M + offs_k)[:, None] * s_pn + offs_d[None, :] * s_pd,
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qh, tl.trans(kh), input_precision="ieee")
        bias = tl.load(KBIAS + b * s_kb + offs_k, mask=k_ok, other=float("-inf"))
        lg = s * scale + bias[None, :]
        tl.store(l_base + rows[:, None] * s_lm + offs_k[None, :], lg, mask=r_ok[:, None] & k_ok[None, :])
    tl.debug_barrier()  # the rows are re-read below by other threads of this program

    # Phase 2: one row at a time.
    offs = tl.arange(0, K_PAD)
    k_ok = offs < K
    kcnt = tl.load(KCNT + b * s_kb + offs, mask=k_ok, other=0.0)
    colw = tl.load(COLW + offs, mask=k_ok, other=0.0)
    has = kcnt > 0
    slots = tl.arange(0, KM_PAD)
    st0 = tl.zeros([], dtype=tl.float64)
    st1 = tl.zeros([], dtype=tl.float64)
    st2 = tl.zeros([], dtype=tl.float64)
    for r in range(ROWS):
        m = pid_m * ROWS + r
        if m < M:
            lg = tl.load(l_base + m * s_lm + offs, mask=k_ok, other=float("-inf"))
            lg = tl.where(lg == 0.0, 0.0, lg)  # -0.0 == +0.0 in the reference's sort: one key for both
            f = tl.load(FORCED + m * s_fm + offs * s_fk, mask=k_ok, other=0)
            fz = f != 0
            cand = (f == 0) & has & (tl.abs(lg) < float("inf"))
            bits = lg.to(tl.uint32, bitcast=True)
            key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)  # unsigned order == float order
            need = tl.minimum(TOPK, tl.sum(cand.to(tl.int32), 0))
            thr = tl.zeros([], dtype=tl.uint32)
            for i in tl.static_range(32):  # largest thr with #(key >= thr) >= need: the need-th largest key
                trial = thr | (1 << (31 - i))
                c = tl.sum((cand & (key >= trial)).to(tl.int32), 0)
                thr = tl.where(c >= need, trial, thr)
            gt = cand & (key > thr)
            eq = cand & (key == thr)
            rank = tl.cumsum(eq.to(tl.int32), 0)
            sel = (fz & has) | gt | (eq & (rank <= need - tl.sum(gt.to(tl.int32), 0)))
            sel_i = sel.to(tl.int32)
            count = tl.sum(sel_i, 0)
            pos = tl.cumsum(sel_i, 0) - 1
            i_base = IDX + b * s_ib + h * s_ih + m * s_im
            tl.store(i_base + pos * s_ik, offs, mask=sel & (pos < K_MAX))
            last = tl.max(tl.where(sel, offs, 0), 0)
            tl.store(i_base + slots * s_ik, tl.zeros([KM_PAD], dtype=tl.int32) + last,
                     mask=(slots >= count) & (slots < K_MAX))
            # k_max below a row's count breaks the contract (the reference raises): never let a reader overrun
            tl.store(CNT + b * s_cb + h * s_ch + m * s_cm, tl.minimum(count, K_MAX))
            mx = tl.max(lg, 0)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            p = tl.exp(lg - mx)
            denom = tl.sum(p, 0)
            kept = tl.sum(tl.where(sel, p, 0.0), 0)
            kept = tl.where(denom > 0, kept / tl.where(denom > 0, denom, 1.0), 0.0)
            w = ROWW + m * 3
            st0 += tl.sum(tl.where(sel, kcnt, 0.0), 0).to(tl.float64) * tl.load(w)
            st1 += tl.sum(tl.where(sel, colw, 0.0), 0).to(tl.float64) * tl.load(w + 1)
            st2 += kept.to(tl.float64) * tl.load(w + 2)
    s_base = STATS + b * s_sb + h * s_sh + pid_m * s_sp
    tl.store(s_base, st0)
    tl.store(s_base + 1, st1)
    tl.store(s_base + 2, st2)
    tl.store(s_base + 3, tl.where(pid_m == 0, tl.load(KTOT + b * s_tb), 0.0))


def supports(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int) -> str | None:
    """None if the kernels can run this call, else the reason."""
    why = bst.device_dtype_problem(q)
    if why:
        return why
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (supported: at most 256)"
    if num_blocks(k.shape[2], block_n) > MAX_KEY_BLOCKS:
        return f"{num_blocks(k.shape[2], block_n)} key blocks (supported: at most {MAX_KEY_BLOCKS})"
    return None


def block_topk_select_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    forced: torch.Tensor,
    keys: KeyBlocks,
    row_weights: torch.Tensor,
    col_weights: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    topk: int,
    k_max: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernels (inputs validated by the dispatcher; ``forced`` uint8 or bool (M, K)); same results as
    the reference. Pass uint8 ``forced`` and fp32 ``keys`` / ``col_weights`` to avoid conversion ops."""
    B, H, N, D = q.shape
    M, K = num_blocks(N, block_m), num_blocks(k.shape[2], block_n)
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    block_d = max(16, triton.next_power_of_2(D))
    k_pad = max(16, triton.next_power_of_2(K))
    if bst.device_capability(dev) is not None:  # via the module: the compile check stands in a GPU here
        rows, kc = 16, (64 if block_d <= 128 else 32)
        # phase 2 holds ~10 (K_PAD,) vectors per thread: 4 warps spill at K_PAD = 2048 on sm_90 (ptxas: 255
        # registers, 768 B), 8 warps take 2048 and 4096 without (kernel_sass.resources)
        warps = 4 if k_pad <= 1024 else (8 if k_pad <= 4096 else 16)
    else:  # interpreter: small tiles keep the tests fast
        rows, kc, warps = 16, 16, 1
    n_prog = triton.cdiv(M, rows)
    pooled = torch.empty(B, H, M + K, D, dtype=torch.float32, device=dev)
    logits = torch.empty(B, H, M, K, dtype=torch.float32, device=dev)
    idx = torch.empty(B, H, M, k_max, dtype=torch.int32, device=dev)
    cnt = torch.empty(B, H, M, dtype=torch.int32, device=dev)
    part = torch.empty(B, H, n_prog, 4, dtype=torch.float64, device=dev)
    w = keys.weights
    if keys.counts.dtype != torch.float32:  # callers on the hot path pass fp32 (no conversion op per call)
        keys = KeyBlocks(keys.counts.float(), keys.bias.float(), keys.total, w)
    if col_weights.dtype != torch.float32:
        col_weights = col_weights.float()
    with launch_guard(q):
        for x, block, row0, ww in ((q, block_m, 0, None), (k, block_n, M, w)):
            tile = min(64, triton.next_power_of_2(block))
            _block_pool_kernel[(num_blocks(x.shape[2], block), B * H)](
                x, ww if ww is not None else x, pooled,
                *x.stride(), *(ww.stride() if ww is not None else (0, 0)), *pooled.stride(),
                H, x.shape[2], D, block, row0,
                TILE=tile, BLOCK_D=block_d, HAS_W=ww is not None, num_warps=4 if warps > 1 else 1,
            )
        kb = keys.counts.stride(0) if keys.counts.shape[0] > 1 else 0
        _block_select_kernel[(n_prog, B * H)](
            pooled, logits, forced.view(torch.uint8) if forced.dtype == torch.bool else forced,
            keys.counts, keys.bias, keys.total, row_weights, col_weights, idx, cnt, part,
            *pooled.stride(), *logits.stride()[:3], *forced.stride(),
            kb, keys.total.stride(0) if keys.total.shape[0] > 1 else 0,
            *idx.stride(), *cnt.stride(), *part.stride()[:3],
            H, M, K, D, topk, k_max, scale,
            ROWS=rows, KC=kc, K_PAD=k_pad, KM_PAD=max(16, triton.next_power_of_2(k_max)), BLOCK_D=block_d,
            num_warps=warps, enable_fp_fusion=False,
        )
    return idx, cnt, part.sum(2)
