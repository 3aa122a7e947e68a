"""TensorMemo: values derived from a tensor reused while it is unchanged, recomputed when it changes."""

from __future__ import annotations

import torch

from diffusers_attn.kernels.memo import TensorMemo, fingerprint


def test_reused_while_unchanged_recomputed_on_edit_new_tensor_or_extra_key():
    memo, calls = TensorMemo(size=2), []

    def f(t):
        calls.append(1)
        return t.sum()

    a, b, c = torch.ones(3), torch.zeros(3), torch.full((3,), 2.0)
    assert memo.get(a, lambda: f(a)) == 3 and memo.get(a, lambda: f(a)) == 3 and len(calls) == 1
    a[0] = 5.0  # in place: version bumped
    assert memo.get(a, lambda: f(a)) == 7 and len(calls) == 2
    assert memo.get(b, lambda: f(b)) == 0 and memo.get(a, lambda: f(a)) == 7 and len(calls) == 3
    assert memo.get(a, lambda: f(a), extra="other") == 7 and len(calls) == 4  # the extra key is part of the key
    memo.get(c, lambda: f(c))  # size 2: the least recent entry (b) is dropped
    memo.get(b, lambda: f(b))
    assert len(calls) == 6


def test_inference_tensors_are_never_cached():
    with torch.inference_mode():
        t = torch.ones(2, 3, dtype=torch.bool)
    assert fingerprint(t) is None
    memo, calls = TensorMemo(), []
    for _ in range(2):
        memo.get(t, lambda: calls.append(1))
    assert len(calls) == 2
