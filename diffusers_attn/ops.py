"""``torch.library`` custom ops, so ``torch.compile`` sees the accelerated attention as one opaque node.

* ``diffusers_attn::block_sparse_attention`` / ``::block_sparse_attention_table``: the kernel entry points,
  defined in :mod:`diffusers_attn.kernels.compile_ops` and re-exported here.
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

import itertools
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F

# The kernel ops live with the kernels (ops calls kernels, never the reverse); re-exported for existing imports.
from .kernels.compile_ops import block_sparse_attention_op, block_sparse_attention_table_op  # noqa: F401

_HANDLES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register_processor(proc: Any) -> int:
    """An integer handle for ``proc`` (weakly referenced)."""
    handle = next(_NEXT)
    _HANDLES[handle] = proc
    return handle


@torch.library.custom_op("diffusers_attn::begin_forward", mutates_args=())
def begin_forward_op(timestep: torch.Tensor, handle: int, frames: int, height: int, width: int) -> torch.Tensor:
    ctx = _HANDLES.get(handle)
    if ctx is None:
        raise RuntimeError("diffusers-attn: the attention context behind this compiled forward no longer exists")
    ctx.begin_forward((frames, height, width), timestep)
    return timestep.new_zeros(1, dtype=torch.float32)


@begin_forward_op.register_fake
def _(timestep, handle, frames, height, width):
    return timestep.new_empty(1, dtype=torch.float32)


@torch.library.custom_op("diffusers_attn::accelerated_attention", mutates_args=())
def accelerated_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], handle: int,
    frames: int, height: int, width: int, video_offset: int, text_offset: int, text_len: int, head_offset: int,
    total_heads: int, token: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from .layout import TokenLayout

    proc = _HANDLES.get(handle)
    if proc is None:
        raise RuntimeError("diffusers-attn: the processor behind this compiled attention call no longer exists")
    layout = TokenLayout(frames, height, width, video_offset, text_offset, text_len)

    def dense() -> torch.Tensor:  # the stock computation (key mask as a boolean attn_mask)
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        backend = getattr(proc, "_attention_backend", None)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # a backend the user chose

        return dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                     backend=backend).transpose(1, 2)

    kwargs = {} if total_heads == 0 else {"head_offset": head_offset, "total_heads": total_heads}
    out = proc.method(q, k, v, layout=layout, key_padding_mask=key_padding_mask, scale=None,
                      layer_index=proc.layer_index, context=proc.context, dense_fn=dense, **kwargs)
    # The fake promises a fresh contiguous tensor: custom ops may not alias inputs, and strides must match.
    if out.is_contiguous() and all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                                   for t in (q, k, v)):
        return out
    return out.contiguous() if not out.is_contiguous() else out.clone()


@accelerated_attention_op.register_fake
def _(q, k, v, key_padding_mask, handle, frames, height, width, video_offset, text_offset, text_len, head_offset,
      total_heads, token=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
