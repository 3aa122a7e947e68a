"""PyTorch implementations of the block-sparse attention contract: the CPU execution path and the oracle.

Two exact implementations, tested against each other and against dense attention with an explicit mask:

* ``segments`` (default): consecutive query blocks with identical key lists form one segment; its key blocks
  become contiguous token ranges (sliced, not gathered, when there is a single run), padded keys are dropped,
  and ``F.scaled_dot_product_attention`` runs the segment. Heads that share lists run together. Work is
  proportional to the kept blocks and uses the platform's optimized SDPA, so it is the fast CPU path.
* ``math``: for a chunk of query blocks, gather the listed key blocks and do an fp32 softmax by hand; memory stays
  at ``chunk x K_max x block_n`` scores instead of ``N^2``. It also returns the log-sum-exp.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Upper bound on the fp32 score tensor of one chunk. Chosen so a chunk fits comfortably in cache-sized working
# sets on CPU and leaves GPU memory alone; the result does not depend on it.
_CHUNK_BYTES = 64 * 1024 * 1024


def block_sparse_attention_torch(
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
    impl: str = "auto",
    chunk_bytes: int = _CHUNK_BYTES,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention in PyTorch (inputs already validated by the dispatcher).

    Returns ``out`` (B, H, Nq, Dv) in ``q.dtype`` and, with ``return_lse``, the natural-log log-sum-exp of the
    scaled scores (B, H, Nq) in fp32. A query row that sees no valid key gets zeros and ``lse = -inf``.
    ``impl``: ``"auto"`` (math when the LSE is requested; else one masked SDPA call when the whole token mask fits
    in ``chunk_bytes``, else segments), ``"segments"``, ``"masked"`` or ``"math"``.
    """
    if impl not in ("auto", "segments", "masked", "math"):
        raise ValueError(f"impl must be 'auto', 'segments', 'masked' or 'math', got {impl!r}")
    if impl == "math" or (impl == "auto" and return_lse):
        return _math_path(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale, return_lse,
                          chunk_bytes)
    if return_lse:
        raise ValueError(f"impl={impl!r} does not return the log-sum-exp; use impl='math'")
    B, H, n_q, _ = q.shape
    # Small problems (tiny models, short clips): per-segment SDPA calls cost far more in Python overhead than one
    # masked call over every score (432 calls of ~3 ms per layer at 585 tokens with 16-token blocks).
    if impl == "masked" or (impl == "auto" and B * H * n_q * k.shape[2] * 4 <= chunk_bytes):
        return _masked_path(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale)
    return _segment_path(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale)


def _masked_path(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale):
    """One SDPA call with the boolean token mask the lists stand for; rows without a valid key give zeros."""
    from .block_format import lists_to_token_mask

    n_q, n_k = q.shape[2], k.shape[2]
    mask = lists_to_token_mask(kv_indices, kv_counts, n_q, n_k, block_m, block_n)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    empty = ~mask.any(-1, keepdim=True)  # (B, H, Nq, 1)
    has_empty = bool(empty.any())
    if has_empty:  # SDPA would give NaN on an all-masked row: let it see every key there, then zero the row
        mask = mask | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if has_empty:
        out = out.masked_fill(empty, 0)
    return out


def _segments(idx: np.ndarray, cnt: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Runs of consecutive query blocks with identical key lists: (m0, m1, key blocks)."""
    M = cnt.shape[0]
    k_max = idx.shape[1]
    valid = np.arange(k_max)[None, :] < cnt[:, None]
    masked = np.where(valid, idx, -1)
    same = np.zeros(M, dtype=bool)
    same[1:] = (cnt[1:] == cnt[:-1]) & (masked[1:] == masked[:-1]).all(1)
    starts = np.flatnonzero(~same)
    ends = np.append(starts[1:], M)
    return [(int(a), int(b), idx[a, : cnt[a]]) for a, b in zip(starts, ends)]


def _key_tokens(blocks: np.ndarray, block_n: int, n_k: int) -> tuple[int, int] | np.ndarray:
    """Token indices of ``blocks`` (ascending): a (start, end) range for one contiguous run, else an array."""
    if blocks.size == 0:
        return np.empty(0, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(blocks) != 1)
    run_start = np.append(blocks[0], blocks[breaks + 1])
    run_end = np.append(blocks[breaks], blocks[-1]) + 1
    if run_start.size == 1:
        return (int(run_start[0]) * block_n, min(int(run_end[0]) * block_n, n_k))
    return np.concatenate(
        [np.arange(a * block_n, min(b * block_n, n_k)) for a, b in zip(run_start.tolist(), run_end.tolist())]
    )


def _segment_path(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale):
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    out = q.new_empty(B, H, n_q, v.shape[-1])
    idx_all = kv_indices.cpu().numpy()
    cnt_all = kv_counts.cpu().numpy()
    kpm_all = key_padding_mask.cpu().numpy() if key_padding_mask is not None else None
    for b in range(B):
        kpm_b = kpm_all[b] if kpm_all is not None else None
        if kpm_b is not None and kpm_b.all():
            kpm_b = None
        shared = all(
            np.array_equal(cnt_all[b, h], cnt_all[b, 0]) and np.array_equal(idx_all[b, h], idx_all[b, 0])
            for h in range(1, H)
        )
        groups = [(0, H)] if shared else [(h, h + 1) for h in range(H)]
        for h0, h1 in groups:
            for m0, m1, blocks in _segments(idx_all[b, h0], cnt_all[b, h0]):
                r0, r1 = m0 * block_m, min(m1 * block_m, n_q)
                if r0 >= n_q:
                    break
                toks = _key_tokens(blocks, block_n, n_k)
                if kpm_b is not None:
                    if isinstance(toks, tuple):
                        toks = np.arange(*toks)
                    toks = toks[kpm_b[toks]]
                # 4-D slices throughout: CPU SDPA takes its fast (flash) kernel only for 4-D inputs.
                if isinstance(toks, tuple):
                    ks = k[b : b + 1, h0:h1, toks[0] : toks[1]]
                    vs = v[b : b + 1, h0:h1, toks[0] : toks[1]]
                    n_keys = toks[1] - toks[0]
                else:
                    n_keys = toks.size
                    if n_keys:
                        ti = torch.from_numpy(toks).to(q.device)
                        ks = k[b : b + 1, h0:h1].index_select(2, ti)
                        vs = v[b : b + 1, h0:h1].index_select(2, ti)
                if n_keys == 0:
                    out[b, h0:h1, r0:r1] = 0
                    continue
                out[b : b + 1, h0:h1, r0:r1] = F.scaled_dot_product_attention(
                    q[b : b + 1, h0:h1, r0:r1], ks, vs, scale=scale
                )
    return out


def _math_path(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale, return_lse, chunk_bytes):
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    Dv = v.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    num_m = kv_counts.shape[-1]
    k_max = kv_indices.shape[-1]
    L = k_max * block_n  # gathered keys per query block

    out = q.new_empty(B, H, n_q, Dv)
    lse = torch.empty(B, H, n_q, dtype=torch.float32, device=q.device) if return_lse else None

    # Work items are (batch, head-range, query-block-range); size them to the byte budget.
    per_block_head = block_m * L * 4 + L * (D + Dv) * 4
    heads_per_chunk = max(1, min(H, chunk_bytes // max(per_block_head, 1)))
    blocks_per_chunk = max(1, min(num_m, chunk_bytes // max(per_block_head * heads_per_chunk, 1)))

    n_offs = torch.arange(block_n, device=q.device)
    slot = torch.arange(k_max, device=q.device)
    for b in range(B):
        kpm_b = None if key_padding_mask is None else key_padding_mask[b]
        for h0 in range(0, H, heads_per_chunk):
            h1 = min(H, h0 + heads_per_chunk)
            hc = h1 - h0
            kb = k[b, h0:h1]
            vb = v[b, h0:h1]
            for m0 in range(0, num_m, blocks_per_chunk):
                m1 = min(num_m, m0 + blocks_per_chunk)
                mc = m1 - m0
                idx = kv_indices[b, h0:h1, m0:m1].long()  # (hc, mc, k_max)
                cnt = kv_counts[b, h0:h1, m0:m1].long()  # (hc, mc)
                tok = idx.unsqueeze(-1) * block_n + n_offs  # (hc, mc, k_max, block_n)
                valid = (slot < cnt.unsqueeze(-1)).unsqueeze(-1) & (tok < n_k)
                tok = tok.clamp_(max=n_k - 1).flatten(-2)  # (hc, mc, L)
                valid = valid.flatten(-2)
                if kpm_b is not None:
                    valid = valid & kpm_b[tok]
                flat = tok.reshape(hc, mc * L, 1)
                ks = torch.gather(kb, 1, flat.expand(hc, mc * L, D)).view(hc, mc, L, D).float()
                vs = torch.gather(vb, 1, flat.expand(hc, mc * L, Dv)).view(hc, mc, L, Dv).float()

                r0 = m0 * block_m
                r1 = min(n_q, m1 * block_m)
                qb = q[b, h0:h1, r0:r1].float()
                pad = mc * block_m - (r1 - r0)
                if pad:
                    qb = torch.nn.functional.pad(qb, (0, 0, 0, pad))
                qb = qb.view(hc, mc, block_m, D)

                s = torch.matmul(qb, ks.transpose(-1, -2)) * scale  # (hc, mc, block_m, L)
                s = s.masked_fill(~valid.unsqueeze(-2), float("-inf"))
                row_max = s.amax(-1, keepdim=True)
                empty = torch.isneginf(row_max)
                row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
                p = torch.exp(s - row_max)
                denom = p.sum(-1, keepdim=True)
                o = torch.matmul(p, vs) / torch.where(empty, torch.ones_like(denom), denom)
                o = o.view(hc, mc * block_m, Dv)[:, : r1 - r0]
                out[b, h0:h1, r0:r1] = o.to(out.dtype)
                if lse is not None:
                    l = (row_max + torch.log(denom)).squeeze(-1)
                    l = torch.where(empty.squeeze(-1), torch.full_like(l, float("-inf")), l)
                    lse[b, h0:h1, r0:r1] = l.reshape(hc, mc * block_m)[:, : r1 - r0]
    if return_lse:
        return out, lse
    return out


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention with an explicit boolean mask (True = attend), fp64 math. For tests only: O(N²) memory.

    Rows with no allowed key return zeros (SDPA would return NaN).
    """
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    empty = torch.isneginf(s.amax(-1, keepdim=True))
    p = torch.softmax(torch.where(empty, torch.zeros_like(s), s), dim=-1)
    p = torch.where(empty, torch.zeros_like(p), p)
    return torch.matmul(p, v.double())


def probe_block_mass_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_bytes: int = _CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax mass of a few probe query rows per key block (PyTorch path of ``probe_block_mass``).

    Exact fp32 softmax of ``q @ k^T * scale`` over all valid keys, chunked over heads so the (heads, P, N) score
    tensor stays under ``chunk_bytes``. Returns ``block_mass`` (B, H, P, ceil(N / block_n)) and, with
    ``token_weights`` (N,), ``token_mass`` (B, H, P) = sum_j p_j * token_weights[j]. Rows with no valid key get 0.
    """
    B, H, P, D = q.shape
    N = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    K = (N + block_n - 1) // block_n
    mass = torch.empty(B, H, P, K, dtype=torch.float32, device=q.device)
    tmass = torch.empty(B, H, P, dtype=torch.float32, device=q.device) if token_weights is not None else None
    tw = token_weights.float() if token_weights is not None else None
    hc = max(1, min(H, chunk_bytes // max(1, 3 * P * K * block_n * 4)))
    for b in range(B):
        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            s = torch.matmul(q[b, h0:h1].float(), k[b, h0:h1].float().transpose(-1, -2)) * scale
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask[b][None, None, :], float("-inf"))
            row_max = s.amax(-1, keepdim=True)
            empty = torch.isneginf(row_max)
            p = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max))
            denom = p.sum(-1, keepdim=True)
            p = p / torch.where(empty, torch.ones_like(denom), denom)  # (hc, P, N); empty rows stay 0
            mass[b, h0:h1] = F.pad(p, (0, K * block_n - N)).view(h1 - h0, P, K, block_n).sum(-1)
            if tw is not None:
                tmass[b, h0:h1] = p @ tw
    return mass, tmass
