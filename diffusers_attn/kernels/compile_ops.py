"""``torch.library`` custom ops for the block-sparse kernels, so ``torch.compile`` sees one opaque node.

``diffusers_attn::block_sparse_attention`` / ``::block_sparse_attention_table`` run the eager dispatch (Triton or
PyTorch backend, chosen inside at run time); the fake implementations give the output shapes. The public entry
points in :mod:`diffusers_attn.kernels` call these ops only while compiling.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import block_sparse_attention_eager, block_sparse_attention_table_eager

__all__ = ["block_sparse_attention_op", "block_sparse_attention_table_op"]


# Optional[...] as torch.library's schema inference has always accepted it.
@torch.library.custom_op("diffusers_attn::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    block_m: int, block_n: int, key_padding_mask: Optional[torch.Tensor], scale: Optional[float], return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    res = block_sparse_attention_eager(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
                                       key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
                                       backend=None if backend == "auto" else backend)
    if return_lse:
        return res[0], res[1]
    return res, q.new_empty(0, dtype=torch.float32)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, scale, return_lse, backend):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32) if return_lse else q.new_empty(0, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("diffusers_attn::block_sparse_attention_table", mutates_args=())
def block_sparse_attention_table_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_indices: torch.Tensor, table_counts: torch.Tensor,
    head_table: torch.Tensor, block_m: int, block_n: int, key_padding_mask: Optional[torch.Tensor],
    scale: Optional[float], backend: str,
) -> torch.Tensor:
    return block_sparse_attention_table_eager(q, k, v, table_indices, table_counts, head_table, block_m=block_m,
                                              block_n=block_n, key_padding_mask=key_padding_mask, scale=scale,
                                              backend=None if backend == "auto" else backend)


@block_sparse_attention_table_op.register_fake
def _(q, k, v, table_indices, table_counts, head_table, block_m, block_n, key_padding_mask, scale, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
