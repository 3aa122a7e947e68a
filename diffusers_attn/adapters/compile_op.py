"""The accelerated attention as one opaque ``torch.library`` custom op for ``torch.compile``.

``diffusers_attn::accelerated_attention`` runs a whole method call of an accelerated processor (ARM, plan lookup,
schedule, stats, kernels). Everything data- or step-dependent stays inside, so a compiled transformer block has no
graph break in the attention path and does not recompile per step. The processor is found through an integer
handle (ops take tensors and scalars only). Processors use the op only while compiling; eager calls go straight to
Python (which keeps the stock dense path bit-identical at ``sparsity=0``).

Python side effects inside (stats, ARM caches) run on every call, so CUDA graphs (``mode="reduce-overhead"``) are
not supported: a replayed graph would skip them.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..layout import TokenLayout

_HANDLES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register_handle(obj: Any) -> int:
    """An integer handle for ``obj`` (weakly referenced): how a custom op finds a processor or a context."""
    handle = next(_NEXT)
    _HANDLES[handle] = obj
    return handle


def lookup_handle(handle: int, what: str) -> Any:
    obj = _HANDLES.get(handle)
    if obj is None:
        raise RuntimeError(f"diffusers-attn: the {what} behind this compiled call no longer exists")
    return obj


@torch.library.custom_op("diffusers_attn::accelerated_attention", mutates_args=())
def accelerated_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], handle: int,
    frames: int, height: int, width: int, video_offset: int, text_offset: int, text_len: int, head_offset: int,
    total_heads: int, token: Optional[torch.Tensor] = None, tile_t: int = 0, tile_h: int = 0, tile_w: int = 0,
) -> torch.Tensor:
    proc = lookup_handle(handle, "processor")
    order = (tile_t, tile_h, tile_w) if tile_t > 0 else None  # the video token order (0: raster)
    layout = TokenLayout(frames, height, width, video_offset, text_offset, text_len, order=order)

    def dense() -> torch.Tensor:  # the stock computation (key mask as a boolean attn_mask)
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        backend = getattr(proc, "_attention_backend", None)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # a backend the user chose

        return dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                     backend=backend).transpose(1, 2)

    out = proc.run_method(q, k, v, layout=layout, key_padding_mask=key_padding_mask, dense_fn=dense,
                          head_offset=head_offset, total_heads=total_heads or None)
    # The fake promises a fresh contiguous tensor: custom ops may not alias inputs, and strides must match.
    if out.is_contiguous() and all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                                   for t in (q, k, v)):
        return out
    return out.contiguous() if not out.is_contiguous() else out.clone()


@accelerated_attention_op.register_fake
def _(q, k, v, key_padding_mask, handle, frames, height, width, video_offset, text_offset, text_len, head_offset,
      total_heads, token=None, tile_t=0, tile_h=0, tile_w=0):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
