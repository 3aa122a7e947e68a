"""Attention kernels: one validated entry point per operation, dispatching to a backend.

``block_sparse_attention`` is the contract every sparse method in this package executes through:

* ``q`` (B, H, Nq, D), ``k`` (B, H, Nk, D), ``v`` (B, H, Nk, Dv): any strides (views of BSHD tensors are fine).
* ``kv_indices`` int32 (B, H, ceil(Nq / block_m), K_max), ``kv_counts`` int32 (B, H, ceil(Nq / block_m)):
  query block ``i`` attends exactly to the keys of blocks ``kv_indices[b, h, i, :kv_counts[b, h, i]]``
  (ascending, no duplicates), minus padded keys. Broadcast views (``expand``) are accepted.
* ``key_padding_mask`` bool (B, Nk), True = valid key.
* A query row that sees no valid key returns zeros (and ``lse = -inf``), never NaN.

Every operation (``block_sparse_attention``, ``block_sparse_attention_table``, ``probe_block_mass``, ``biwkv``,
``block_topk_select``)
dispatches through one registry (:mod:`.registry`): ``"torch"`` (exact PyTorch, any device), ``"triton"`` (picked
automatically on CUDA), ``"flex"`` (PyTorch FlexAttention; automatic on CUDA where Triton cannot run a call) and
whatever :func:`register_backend` adds. ``backend=None`` picks automatically; the environment variable
``DIFFATTN_KERNEL`` (a backend name or ``auto``) overrides the automatic choice for debugging. The first call of a
fast backend per (device, dtype, head_dim) is checked against the reference (:mod:`.selfcheck`,
``DIFFATTN_SELF_CHECK``); a failing one falls back to Flex, then PyTorch.
Set ``DIFFATTN_CHECKS=1`` to also validate index contents (costs a device sync).

This package has no model knowledge and never imports Triton at import time.
"""

from __future__ import annotations

import torch

from .biwkv import biwkv, biwkv_chunked, biwkv_cumsum, biwkv_reference, select_biwkv_backend
from .block_format import (
    block_mask_to_lists,
    expand_block_mask,
    lists_to_block_mask,
    lists_to_token_mask,
    num_blocks,
)
from .block_select import KeyBlocks, block_topk_select_torch, key_blocks
from .compile_ops import block_sparse_attention_op, block_sparse_attention_table_op
from .dispatch import (
    block_sparse_attention_eager,
    block_sparse_attention_table_eager,
    block_topk_select,
    fast_kernel_unavailable,
    probe_block_mass,
    select_backend,
    selection_backend,
)
from .reference import block_sparse_attention_torch, masked_attention_reference, probe_block_mass_torch
from .registry import OPERATIONS, available_backends, register_backend, unregister_backend
from .selfcheck import self_check_failures

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_table",
    "probe_block_mass",
    "block_topk_select",
    "KeyBlocks",
    "key_blocks",
    "block_topk_select_torch",
    "selection_backend",
    "select_backend",
    "fast_kernel_unavailable",
    "available_backends",
    "register_backend",
    "unregister_backend",
    "self_check_failures",
    "OPERATIONS",
    "block_mask_to_lists",
    "lists_to_block_mask",
    "lists_to_token_mask",
    "expand_block_mask",
    "num_blocks",
    "block_sparse_attention_torch",
    "masked_attention_reference",
    "probe_block_mass_torch",
    "biwkv",
    "biwkv_chunked",
    "biwkv_cumsum",
    "biwkv_reference",
    "select_biwkv_backend",
]


def block_sparse_attention(
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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention (see the module docstring for the contract).

    Returns ``out`` (B, H, Nq, Dv) in ``q.dtype``; with ``return_lse`` also the fp32 log-sum-exp (B, H, Nq).
    Under ``torch.compile`` this is the custom op ``diffusers_attn::block_sparse_attention`` (no graph break).
    """
    if torch.compiler.is_compiling():
        out, lse = block_sparse_attention_op(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask,
                                             scale, return_lse, backend or "auto")
        return (out, lse) if return_lse else out
    return block_sparse_attention_eager(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
                                        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
                                        backend=backend)


def block_sparse_attention_table(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table_indices: torch.Tensor,
    table_counts: torch.Tensor,
    head_table: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with compact per-pattern lists: head (b, h) uses ``table_indices[head_table[b, h]]``
    (P, M, K_max) and ``table_counts[head_table[b, h]]`` (P, M). Same semantics as :func:`block_sparse_attention`
    with the lists expanded per head, without materializing them (the Triton kernel reads the table directly).
    Under ``torch.compile`` this is the custom op ``diffusers_attn::block_sparse_attention_table`` (no LSE)."""
    if torch.compiler.is_compiling():
        return block_sparse_attention_table_op(q, k, v, table_indices, table_counts, head_table, block_m, block_n,
                                               key_padding_mask, scale, backend or "auto")
    return block_sparse_attention_table_eager(q, k, v, table_indices, table_counts, head_table, block_m=block_m,
                                              block_n=block_n, key_padding_mask=key_padding_mask, scale=scale,
                                              return_lse=return_lse, backend=backend)
