"""The block-sparse interchange format and conversions.

A plan for one (batch, head) is a list of key blocks per query block:
``kv_indices[..., m, :kv_counts[..., m]]`` are the key blocks that query block ``m`` attends to, ascending and
deduplicated; entries past the count are ignored (we pad with the last valid index so a kernel that prefetches
never reads out of range). This is the same information as FlexAttention's ``BlockMask`` (partial blocks only)
and flash-attention CuTe's ``BlockSparseTensorsTorch``.

Nothing here knows about models: shapes and boolean block masks only.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "num_blocks",
    "block_mask_to_lists",
    "lists_to_block_mask",
    "expand_block_mask",
    "lists_to_token_mask",
]


def num_blocks(n: int, block: int) -> int:
    """ceil(n / block)."""
    return (n + block - 1) // block


def block_mask_to_lists(block_mask: torch.Tensor, k_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a boolean block mask ``[..., M, K]`` to ``(kv_indices int32 [..., M, K_max], kv_counts int32 [..., M])``.

    ``K_max`` is ``k_max`` when given (raises if a row lists more blocks; may exceed K), else the largest row count
    (at least 1). Padding slots repeat the last valid index of the row (0 for empty rows).
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be bool, got {block_mask.dtype}")
    counts = block_mask.sum(-1)
    top = int(counts.max().item()) if counts.numel() else 0
    if k_max is None:
        k_max = max(top, 1)
    elif top > k_max:
        raise ValueError(f"a row selects {top} key blocks, more than k_max={k_max}")
    num_k = block_mask.shape[-1]
    # Sort key: selected blocks first in ascending order, then unselected ones.
    ar = torch.arange(num_k, device=block_mask.device)
    key = torch.where(block_mask, ar, ar + num_k)
    order = key.argsort(dim=-1, stable=True)[..., :k_max]
    if order.shape[-1] < k_max:  # wider than a row: the extra slots are padding
        order = torch.cat([order, order[..., -1:].expand(*order.shape[:-1], k_max - num_k)], -1)
    slot = torch.arange(k_max, device=block_mask.device)
    valid = slot < counts.unsqueeze(-1)
    last = torch.gather(order, -1, (counts.clamp(min=1) - 1).unsqueeze(-1))
    last = torch.where(counts.unsqueeze(-1) > 0, last, torch.zeros_like(last))
    idx = torch.where(valid, order, last)
    return idx.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def lists_to_block_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_lists`: a boolean ``[..., M, num_k_blocks]`` mask."""
    k_max = kv_indices.shape[-1]
    valid = torch.arange(k_max, device=kv_indices.device) < kv_counts.unsqueeze(-1).long()
    hits = torch.zeros(*kv_indices.shape[:-1], num_k_blocks, dtype=torch.int32, device=kv_indices.device)
    # scatter_add (not scatter) because padding slots may repeat a valid index.
    hits.scatter_add_(-1, kv_indices.long().clamp(0, num_k_blocks - 1), valid.to(torch.int32))
    return hits > 0


def expand_block_mask(block_mask: torch.Tensor, n_q: int, n_k: int, block_m: int, block_n: int) -> torch.Tensor:
    """Expand a block mask ``[..., M, K]`` to the token mask ``[..., n_q, n_k]`` (relaxed semantics)."""
    m, k = block_mask.shape[-2:]
    if m != num_blocks(n_q, block_m) or k != num_blocks(n_k, block_n):
        raise ValueError(
            f"block mask {tuple(block_mask.shape[-2:])} does not match n_q={n_q}, n_k={n_k}, "
            f"block_m={block_m}, block_n={block_n}"
        )
    tok = block_mask.repeat_interleave(block_m, dim=-2)[..., :n_q, :]
    return tok.repeat_interleave(block_n, dim=-1)[..., :n_k]


def lists_to_token_mask(
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    n_q: int,
    n_k: int,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """The boolean token mask ``[..., n_q, n_k]`` that a block list stands for (for tests and oracles)."""
    bm = lists_to_block_mask(kv_indices, kv_counts, math.ceil(n_k / block_n))
    return expand_block_mask(bm, n_q, n_k, block_m, block_n)
