"""``torch.library`` custom ops, so ``torch.compile`` sees the accelerated attention as one opaque node.

* ``diffusers_attn::block_sparse_attention`` / ``::block_sparse_attention_table``: the kernel entry points
  (Triton or PyTorch path, chosen inside), with fake implementations giving output shapes.
* ``diffusers_attn::accelerated_attention``: a whole method call of an accelerated processor (ARM, plan lookup,
  schedule, stats, kernels). Everything data- or step-dependent stays inside, so a compiled transformer block has
  no graph break in the attention path and does not recompile per step. The processor is found through an integer
  handle (ops take tensors and scalars only).
* ``diffusers_attn::begin_forward``: the context hook's bookkeeping (step counting from the timestep value, new
  generation detection) when the whole transformer is compiled. It must run at run time, not at trace time, and
  before the layers: it returns a token tensor that every ``accelerated_attention`` call takes as an input, which
  orders the calls and keeps the op from being dead-code eliminated.

Python side effects inside these ops (stats, ARM caches) run on every call, so CUDA graphs (``mode="reduce-overhead"``)
are not supported: a replayed graph would skip them.

Processors use these ops only while compiling (``torch.compiler.is_compiling()``); eager calls go straight to the
Python implementation (which also keeps the stock dense path bit-identical at ``sparsity=0``).
"""

from __future__ import annotations

from typing import Optional

import torch

@torch.library.custom_op("diffusers_attn::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    block_m: int, block_n: int, key_padding_mask: Optional[torch.Tensor], scale: Optional[float], return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels import block_sparse_attention

    res = block_sparse_attention(q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
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
    from .kernels import block_sparse_attention_table

    return block_sparse_attention_table(q, k, v, table_indices, table_counts, head_table, block_m=block_m,
                                        block_n=block_n, key_padding_mask=key_padding_mask, scale=scale,
                                        backend=None if backend == "auto" else backend)


@block_sparse_attention_table_op.register_fake
def _(q, k, v, table_indices, table_counts, head_table, block_m, block_n, key_padding_mask, scale, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# The processor-level ops live with what they run: the method call with the processor base, the step bookkeeping
# with the context.
from .adapters.compile_op import accelerated_attention_op, register_handle as register_processor  # noqa: E402,F401
from .context import begin_forward_op  # noqa: E402,F401
