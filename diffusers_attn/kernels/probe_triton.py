"""Triton kernel for ``probe_block_mass``: the softmax mass of a few probe query rows per key block.

Sparse-attention predictors (RainFusion's ARM) score candidate masks by how much attention mass of sampled query
rows falls inside them. Done with plain PyTorch this materialises and re-reads a (heads, P, N) fp32 score tensor
several times (matmul, mask, softmax, pad, block sum, token sum): memory traffic that grows with N and costs far
more than the probe's FLOPs. Here one program takes ``BLOCK_P`` probe rows of one (batch, head) and streams the
keys twice: pass 1 computes the row max and normaliser online (exp2 domain), pass 2 writes each key block's
normalised mass and accumulates the mass on optional per-token weights. Only (B, H, P, K) floats are written.

Inputs fp16 / bf16 (fp32 accumulation; products of 16-bit floats are exact in fp32) or fp32 (IEEE dots), any
strides, head_dim up to 256 (padded in registers), any N, optional key padding mask. Rows with no valid key get 0.
Imported lazily; on CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import block_sparse_triton as bst
from .block_sparse_triton import _pow2_divisor, _tile_scores, launch_guard

_LOG2E = 1.4426950408889634


@triton.jit
def _probe_mass_kernel(
    Q, K, KPM, TW, MASS, TMASS,
    s_qb, s_qh, s_qp, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_pb, s_pn,
    s_tw,
    s_mb, s_mh, s_mp, s_mk,
    s_tb, s_th, s_tp,
    H, NP, NK, HEAD_DIM, qk_scale,
    LIST_BN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_TW: tl.constexpr, IEEE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < NP
    if EVEN_D:
        q_mask = p_ok[:, None]
    else:
        q_mask = p_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_p[:, None] * s_qp + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    SUB: tl.constexpr = LIST_BN // BLOCK_N
    num_kb = tl.cdiv(NK, LIST_BN)

    # Pass 1: row max and normaliser.
    m_i = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_P], dtype=tl.float32)
    for kb in range(num_kb):
        for s in tl.static_range(SUB):
            offs_n = tl.arange(0, BLOCK_N).to(tl.int64) + (kb * LIST_BN + s * BLOCK_N)  # 64-bit: N * stride > 2**31
            qk, _ = _tile_scores(q, k_base, KPM + b * s_pb, s_kn, s_kd, s_pn, offs_n, offs_d, NK, HEAD_DIM,
                                 qk_scale, EVEN_D, HAS_KPM, IEEE)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
            m_i = m_new

    # Pass 2: normalised mass per key block (and on the token weights).
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    t_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    mass_base = MASS + b * s_mb + h * s_mh + offs_p * s_mp
    for kb in range(num_kb):
        blk = tl.zeros([BLOCK_P], dtype=tl.float32)
        for s in tl.static_range(SUB):
            offs_n = tl.arange(0, BLOCK_N).to(tl.int64) + (kb * LIST_BN + s * BLOCK_N)  # 64-bit: N * stride > 2**31
            qk, _ = _tile_scores(q, k_base, KPM + b * s_pb, s_kn, s_kd, s_pn, offs_n, offs_d, NK, HEAD_DIM,
                                 qk_scale, EVEN_D, HAS_KPM, IEEE)
            p = tl.exp2(qk - m_fin[:, None]) * inv_l[:, None]
            blk += tl.sum(p, 1)
            if HAS_TW:
                tw = tl.load(TW + offs_n * s_tw, mask=offs_n < NK, other=0.0)
                t_acc += tl.sum(p * tw[None, :], 1)
        tl.store(mass_base + kb * s_mk, blk, mask=p_ok)
    if HAS_TW:
        tl.store(TMASS + b * s_tb + h * s_th + offs_p * s_tp, t_acc, mask=p_ok)


def supports(q: torch.Tensor, k: torch.Tensor, block_n: int) -> str | None:
    """None if the kernel can run this call, else the reason."""
    why = bst.device_dtype_problem(q)
    if why:
        return why
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (supported: at most 256)"
    if block_n % 16:
        return f"block_n {block_n} (supported: multiples of 16)"
    return None


def probe_block_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel (inputs validated by the dispatcher); same results as ``probe_block_mass_torch``."""
    B, H, P, D = q.shape
    N = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    K = triton.cdiv(N, block_n)
    if bst.device_capability(q.device) is not None:  # via the module: the compile check stands in a GPU here
        block_p = 128 if P >= 128 else 64
        bn_t = _pow2_divisor(64, block_n)
        warps, stages = (8 if D > 64 else 4), 2
    else:  # interpreter: small tiles keep the tests fast
        block_p, bn_t, warps, stages = 16, _pow2_divisor(16, block_n), 1, 1
    block_d = max(16, triton.next_power_of_2(D))
    mass = torch.empty(B, H, P, K, dtype=torch.float32, device=q.device)
    tmass = torch.empty(B, H, P, dtype=torch.float32, device=q.device) if token_weights is not None else None
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else mass
    tw = token_weights.float().contiguous() if token_weights is not None else mass
    grid = (triton.cdiv(P, block_p), B * H)
    with launch_guard(q):
        _probe_mass_kernel[grid](
            q, k, kpm, tw, mass, tmass if tmass is not None else mass,
            *q.stride(), *k.stride(),
            *(kpm.stride() if key_padding_mask is not None else (0, 0)),
            tw.stride(0) if token_weights is not None else 0,
            *mass.stride(),
            *(tmass.stride() if tmass is not None else (0, 0, 0)),
            H, P, N, D, scale * _LOG2E,
            LIST_BN=block_n, BLOCK_P=block_p, BLOCK_N=bn_t, BLOCK_D=block_d, EVEN_D=block_d == D,
            HAS_KPM=key_padding_mask is not None, HAS_TW=token_weights is not None, IEEE=q.dtype == torch.float32,
            num_warps=warps, num_stages=stages, enable_fp_fusion=True,  # explicit: triton 3.10 turns the default off
        )
    return mass, tmass
