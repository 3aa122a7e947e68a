"""The contract between model adapters and attention methods.

An adapter computes ``q, k, v`` exactly as the stock processor would, in (B, H, N, D) form, describes the sequence
with a :class:`~diffusers_attn.layout.TokenLayout`, and hands the method a ``dense_fn`` that runs the stock
attention call unchanged. The method returns the attention output (B, H, N, D). With the method deciding
"dense", it must return ``dense_fn()`` itself, so the processor reproduces the stock processor bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from ..layout import TokenLayout
from ..stats import FALLBACK

if TYPE_CHECKING:
    from ..context import AttentionContext


class AttentionMethod(Protocol):
    """What a processor calls. ``name`` identifies the method in stats."""

    name: str

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
        layer_index: int,
        context: "AttentionContext",
        dense_fn: Callable[[], torch.Tensor],
    ) -> torch.Tensor: ...


def record_dense_fallback(
    context: "AttentionContext",
    layer_index: int,
    reason: str,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    n_q: int,
    n_k_valid: float,
    n_video: int,
    head_offset: int = 0,
    total_heads: int | None = None,
) -> None:
    """Count a whole layer call that ran the stock dense path (density 1), with its reason."""
    pairs = float(n_q) * n_k_valid * head_dim * heads
    vpairs = float(n_video) * n_video * head_dim * heads * batch
    context.stats.record(
        layer_index,
        head_patterns=np.full((batch, heads), FALLBACK, dtype=np.int64),
        computed=pairs,
        total=pairs,
        video_computed=vpairs,
        video_total=vpairs,
        fallback_reason=reason,
        head_offset=head_offset,
        total_heads=total_heads,
    )


def valid_key_counts(key_padding_mask: torch.Tensor | None, batch: int, n_k: int) -> list[int]:
    """Valid keys per batch element (one small device->host copy)."""
    if key_padding_mask is None:
        return [n_k] * batch
    return [int(x) for x in key_padding_mask.sum(-1).tolist()]
