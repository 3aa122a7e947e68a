"""Reuse of values derived from a tensor that every layer of a forward passes unchanged (e.g. a key padding mask):
computed on the first layer, reused by the others, recomputed when the tensor or its contents change."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["TensorMemo", "fingerprint"]


def fingerprint(t: torch.Tensor) -> tuple | None:
    """Identity of ``t``'s contents: memory, layout, dtype, device and version counter (bumped by in-place edits).
    None for an inference tensor, which has no version counter: an in-place edit could not be detected."""
    if t.is_inference():
        return None
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


class TensorMemo:
    """The last ``size`` values derived from tensors, keyed by :func:`fingerprint` (and an optional extra key).
    The tensors are held with their values, so their memory cannot be reused by another tensor while cached.
    Inference tensors are never cached (the value is computed on every call)."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self._entries: list[tuple[torch.Tensor, tuple, Any]] = []  # most recent first

    def get(self, t: torch.Tensor, compute: Callable[[], Any], extra: Hashable = ()) -> Any:
        fp = fingerprint(t)
        if fp is None:
            return compute()
        key = (fp, extra)
        for i, (_, k, value) in enumerate(self._entries):
            if k == key:
                if i:
                    self._entries.insert(0, self._entries.pop(i))
                return value
        value = compute()
        self._entries.insert(0, (t, key, value))
        del self._entries[self.size:]
        return value

    def clear(self) -> None:
        self._entries.clear()
