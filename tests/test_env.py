"""Environment variables: ``DIFFATTN_*``, with the deprecated ``DIFFUSERS_ATTN_*`` names still read."""

from __future__ import annotations

import warnings

import pytest

from diffusers_attn import _env
from diffusers_attn._env import env_flag, env_var


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
