"""Block top-k selection (``block_topk_select``): per query block, the key blocks whose pooled scores rank highest.

The selection step of online block-sparse methods (RainFusion 2.0 and the like), as one operation:

1. Mean-pool q over blocks of ``block_m`` queries and k over blocks of ``block_n`` keys (the last block of each may
   be short; padded keys excluded, a key block without a valid key pools to 0).
2. Scores ``logits = q_hat @ k_hat.T * scale + bias``, ``bias = log(valid keys of the key block)`` (-inf for a
   fully padded block): the softmax over key blocks then estimates each block's attention mass.
3. Per (batch, head, query block) row: the ``forced`` blocks (a (M, K) mask shared by every head) that have a valid
   key, plus the ``topk`` highest-scoring of the other blocks with a valid key and a finite score. Ties go to the
   lower block index; a row with fewer such blocks than ``topk`` takes all of them.
4. The rows as kernel lists: ``kv_indices`` int32 (B, H, M, k_max) ascending, padded with the row's last listed
   block (0 for an empty row), ``kv_counts`` int32 (B, H, M). ``k_max`` must be at least every row's count (its
   forced blocks plus ``topk``).
5. ``stats`` (B, H, 4) fp64: ``sum_m row_weights[m, 0] * sum_{j listed} valid keys of j``,
   ``sum_m row_weights[m, 1] * sum_{j listed} col_weights[j]``,
   ``sum_m row_weights[m, 2] * sum_{j listed} softmax(logits[m])_j`` and the valid keys of the batch element
   (e.g. computed pairs, weighted pairs, kept estimated mass, the dense denominator).

Accumulation in fp32 for 16-bit and fp32 inputs, fp64 for fp64 inputs; the pair statistics are exact (integer
counts below 2^24 summed in fp32, weighted in fp64). The key-side constants depend only on the key padding mask:
:func:`key_blocks` builds them once (callers reuse them for every layer of a forward).

This module holds the PyTorch reference (any device, the oracle of the Triton kernel in
:mod:`.block_select_triton`); the validated entry point is :func:`diffusers_attn.kernels.block_topk_select`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .block_format import block_mask_to_lists, num_blocks

__all__ = ["KeyBlocks", "block_topk_select_torch", "key_blocks", "topk_lower_index"]


class KeyBlocks(NamedTuple):
    """Key-side constants of a selection: ``counts`` (B' , K) valid keys per key block and ``bias`` = log(counts)
    (B', K), both in the accumulation dtype, ``total`` (B',) fp64 valid keys, ``weights`` uint8 (B, N) view of the
    key padding mask or None. B' is 1 (no padding: broadcast over the batch) or B."""

    counts: torch.Tensor
    bias: torch.Tensor
    total: torch.Tensor
    weights: torch.Tensor | None


def key_blocks(n: int, block_n: int, key_padding_mask: torch.Tensor | None, device: torch.device,
               dtype: torch.dtype = torch.float32) -> KeyBlocks:
    """:class:`KeyBlocks` of ``n`` keys in blocks of ``block_n`` (``dtype``: the accumulation dtype)."""
    K = num_blocks(n, block_n)
    kb = torch.arange(n, device=device) // block_n
    if key_padding_mask is None:
        counts = torch.bincount(kb, minlength=K).to(dtype)[None]
        weights = None
    else:
        B = key_padding_mask.shape[0]
        counts = torch.zeros(B, K, dtype=dtype, device=device).index_add(1, kb, key_padding_mask.to(dtype))
        weights = key_padding_mask.view(torch.uint8)
    # integer counts: exact in any summation order, so every implementation gets the same bias bits
    return KeyBlocks(counts, counts.log(), counts.sum(-1, dtype=torch.float64), weights)


def _block_means(x: torch.Tensor, block: int, acc: torch.dtype, w: torch.Tensor | None = None) -> torch.Tensor:
    """Means of ``x`` (B, H, N, D) over blocks of ``block`` tokens (the last may be short) in ``acc``; with 0/1
    weights ``w`` (B, N) over the weighted tokens only (0 for a block without one)."""
    B, H, N, D = x.shape
    nb = num_blocks(N, block)
    pad = nb * block - N
    xs = x.to(acc)
    ws = torch.ones(1, N, dtype=acc, device=x.device) if w is None else w.to(acc)
    xs = xs * ws[:, None, :, None]
    xs = torch.nn.functional.pad(xs, (0, 0, 0, pad)).view(B, H, nb, block, D).sum(3)
    cnt = torch.nn.functional.pad(ws, (0, pad)).view(-1, nb, block).sum(-1)  # (B' , nb)
    return xs / cnt.clamp_min(1)[:, None, :, None]


def topk_lower_index(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest ``scores`` per row (last dim) among ``eligible`` entries; ties go to the
    lower index, a row with fewer eligible entries takes all of them. A stable descending sort, not ``topk``
    (whose tie order is unspecified), so every implementation can follow the same rule."""
    picked = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return picked
    vals, idx = torch.where(eligible, scores, float("-inf")).sort(dim=-1, descending=True, stable=True)
    return picked.scatter(-1, idx[..., :k], vals[..., :k] > float("-inf"))


@torch.no_grad()
def block_topk_select_torch(
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
    """PyTorch reference of ``block_topk_select`` (module docstring; inputs validated by the dispatcher)."""
    B, H, _, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if scale is None else float(scale)
    counts, bias = keys.counts.to(acc), keys.bias.to(acc)
    q_hat = _block_means(q, block_m, acc)
    k_hat = _block_means(k, block_n, acc, keys.weights)
    logits = (q_hat @ k_hat.transpose(-1, -2)) * scale + bias[:, None, None, :]  # (B, H, M, K)
    has = (counts > 0)[:, None, None, :]
    forced = forced.bool()
    eligible = ~forced & has & logits.isfinite()
    sel = (forced & has) | topk_lower_index(logits, eligible, topk)
    idx, cnt = block_mask_to_lists(sel, k_max)
    p = logits.softmax(-1).nan_to_num(0.0)  # a batch element without a valid key: all -inf, nothing listed
    s = sel.to(acc)
    f64 = torch.float64
    rows = torch.stack([
        (s * counts[:, None, None, :]).sum(-1).to(f64),
        (s * col_weights.to(acc)).sum(-1).to(f64),
        (s * p).sum(-1).to(f64),
    ], -1)  # (B, H, M, 3)
    stats = (rows * row_weights.to(f64)).sum(2)
    total = keys.total.to(f64).expand(B).view(B, 1, 1).expand(B, H, 1)
    return idx, cnt, torch.cat([stats, total], -1)
