"""The contract between model adapters and attention methods.

An adapter computes ``q, k, v`` exactly as the stock processor would, in (B, H, N, D) form, describes the sequence
with a layout (:class:`~diffusers_attn.layout.TokenLayout` for video DiTs), and hands the method a ``dense_fn``
that runs the stock attention call unchanged. The method returns the attention output (B, H, N, D) and a
:class:`MethodRecord` of what it computed; it never writes stats itself (the processor base does). With the
method deciding "dense", it must return ``dense_fn()`` itself, so the processor reproduces the stock processor
bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol

import numpy as np
import torch


@contextmanager
def _no_timer(name: str, device: torch.device) -> Iterator[None]:
    yield


@dataclass(frozen=True)
class CallInfo:
    """Where one attention call sits in the run: all a method knows about the model beyond the layout."""

    layer_index: int
    step: int = 0  # denoising step of the current generation (0-based)
    call_in_step: int = 0  # forwards already seen in this step (CFG run as separate calls)
    num_steps: int | None = None  # total steps of the generation, when known
    head_offset: int = 0  # global id of this call's head 0 (context parallelism gives a rank a slice of heads)
    total_heads: int | None = None  # heads over all ranks (None: this call holds all of them)
    timer: Callable[[str, torch.device], ContextManager[None]] = _no_timer  # times sections into the stats


#: head id meaning "not counted" (a method with no per-head pattern, e.g. FEAT)
NOT_COUNTED = -1


@dataclass
class PendingStats:
    """The device tensors a record's numbers come from, read on the host only when the stats are read (one copy
    for every pending call, no synchronisation per call). ``finish`` receives them as host arrays (same shapes,
    float64) and returns the record's numeric fields: ``head_patterns``, ``computed``, ``total``,
    ``video_computed``, ``video_total`` and optionally ``recalls``."""

    tensors: tuple[torch.Tensor, ...]
    finish: Callable[[list[np.ndarray]], dict[str, Any]]


@dataclass
class MethodRecord:
    """What one attention call computed. ``head_patterns`` (B, H) are indices into ``pattern_names``
    (``NOT_COUNTED`` = none); pair counts are (query, key) pairs times head_dim, summed over batch and heads."""

    head_patterns: np.ndarray
    computed: float
    total: float
    video_computed: float
    video_total: float
    pattern_names: tuple[str, ...] = ("dense",)
    recalls: np.ndarray | None = None  # (B, H, R) recognizer scores, averaged per head in the stats
    fallback_reason: str | None = None  # the whole call ran the stock dense path, and why
    kernel: str | None = None  # kernel backend that executed the call (counted per backend)
    slow_path: str | None = None  # why a GPU call could not take the fast kernel
    decision: Any = None  # the method's per-head decision, kept as the layer's last decision for inspection
    group: int | None = None  # a sub-step with its own density, counted as a step (VAR: the scale)
    group_name: str = "group"
    info: dict[str, Any] = field(default_factory=dict)  # merged into the stats' info
    pending: PendingStats | None = None  # numbers still on the device (the fields above are placeholders)
    # pattern name -> (computed, total) video x video pairs times head_dim of the heads that ran it; needed only
    # when heads of one call ran different patterns (one pattern per call is split by the stats themselves)
    pattern_video_pairs: dict[str, tuple[float, float]] | None = None


class AttentionMethod(Protocol):
    """What a processor calls. ``name`` identifies the method in stats."""

    name: str

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: Any,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
        call: CallInfo,
        dense_fn: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, MethodRecord]: ...


def dense_record(
    reason: str | None,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    n_q: int,
    n_k_valid: float | torch.Tensor,
    n_video: int,
    pattern_names: tuple[str, ...] = ("dense",),
) -> MethodRecord:
    """The record of a whole layer call that ran the stock dense path (density 1), with its reason.
    ``n_k_valid``: valid keys summed over the batch; a device tensor (e.g. a padding mask's per-row counts) is
    summed when the stats are read (no host read per call)."""
    vpairs = float(n_video) * n_video * head_dim * heads * batch

    def fields(n_valid: float) -> dict[str, Any]:
        pairs = float(n_q) * n_valid * head_dim * heads
        return {"head_patterns": np.zeros((batch, heads), dtype=np.int64), "computed": pairs, "total": pairs,
                "video_computed": vpairs, "video_total": vpairs}

    if isinstance(n_k_valid, torch.Tensor):
        return deferred_record((n_k_valid,), lambda a: fields(float(a[0].sum())), pattern_names=pattern_names,
                               fallback_reason=reason)
    return MethodRecord(**fields(float(n_k_valid)), pattern_names=pattern_names, fallback_reason=reason)


def deferred_record(tensors: tuple[torch.Tensor, ...], finish: Callable[[list[np.ndarray]], dict[str, Any]],
                    **fields: Any) -> MethodRecord:
    """A record whose numbers are computed from device ``tensors`` when the stats are read (see PendingStats)."""
    return MethodRecord(head_patterns=np.zeros((0, 0), dtype=np.int64), computed=0.0, total=0.0, video_computed=0.0,
                        video_total=0.0, pending=PendingStats(tuple(tensors), finish), **fields)


def valid_key_counts(key_padding_mask: torch.Tensor | None, batch: int, n_k: int) -> list[int]:
    """Valid keys per batch element (one small device->host copy)."""
    if key_padding_mask is None:
        return [n_k] * batch
    return [int(x) for x in key_padding_mask.sum(-1).tolist()]

