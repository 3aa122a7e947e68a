"""Environment variables: ``DIFFATTN_*``, with the deprecated ``DIFFUSERS_ATTN_*`` names still read."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusers_attn import _env
from diffusers_attn._env import env_flag, env_var
from diffusers_attn.kernels import block_mask_to_lists, block_sparse_attention


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(_env, "_warned", set())  # each test sees the one-time warning afresh
    for name in ("KERNEL", "CHECKS", "SOMETHING"):
        monkeypatch.delenv("DIFFATTN_" + name, raising=False)
        monkeypatch.delenv("DIFFUSERS_ATTN_" + name, raising=False)


def test_new_name_is_read_without_warning(monkeypatch):
    monkeypatch.setenv("DIFFATTN_SOMETHING", "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env_var("SOMETHING") == "x"
    assert env_var("MISSING_VARIABLE", "default") == "default"


def test_old_name_still_works_with_one_warning(monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ATTN_SOMETHING", "y")
    with pytest.warns(FutureWarning, match="DIFFUSERS_ATTN_SOMETHING is deprecated: rename it to DIFFATTN_SOMETHING"):
        assert env_var("SOMETHING") == "y"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per variable
        assert env_var("SOMETHING") == "y"


def test_new_name_wins_when_both_are_set(monkeypatch):
    monkeypatch.setenv("DIFFATTN_SOMETHING", "new")
    monkeypatch.setenv("DIFFUSERS_ATTN_SOMETHING", "old")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old one is simply ignored (diffusers may want it for itself)
        assert env_var("SOMETHING") == "new"
    monkeypatch.setenv("DIFFATTN_CHECKS", "0")
    monkeypatch.setenv("DIFFUSERS_ATTN_CHECKS", "1")  # diffusers' own checks, not ours
    assert not env_flag("CHECKS")


def _bad_lists():
    q = torch.randn(1, 1, 32, 8)
    idx, cnt = block_mask_to_lists(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    bad = idx.clone()
    bad[..., 0, :] = torch.tensor([1, 0], dtype=torch.int32)  # descending
    return q, idx, bad, cnt


@pytest.mark.parametrize("prefix", ["DIFFATTN_", "DIFFUSERS_ATTN_"])
def test_kernel_variables_under_both_names(prefix, monkeypatch):
    q, idx, bad, cnt = _bad_lists()
    monkeypatch.setenv(prefix + "CHECKS", "1")
    monkeypatch.setenv(prefix + "KERNEL", "nope")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="ascending"):
            block_sparse_attention(q, q, q, bad, cnt, block_m=16, block_n=16)
        with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
            block_sparse_attention(q, q, q, idx, cnt, block_m=16, block_n=16)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    if prefix == "DIFFATTN_":
        assert not deprecations
    else:
        assert any("DIFFATTN_CHECKS" in m for m in deprecations) and any("DIFFATTN_KERNEL" in m for m in deprecations)
