"""Dense-head routing: measured once per key, the faster side chosen, never assumed; safe under capture/compile."""

from __future__ import annotations

import logging

import pytest
import torch

from diffusers_attn.kernels import dense_route


@pytest.fixture(autouse=True)
def _fresh():
    dense_route.reset()
    yield
    dense_route.reset()


def _qkv(n=40, heads=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, n, d, generator=g) for _ in range(3)]


def _fake_clock(monkeypatch, kernel_ms: float, sdpa_ms: float) -> list[str]:
    """Replace the clock: each timed call runs for real, then reports the given time for its side."""
    seen: list[str] = []

    def elapsed(fn, device):
        fn()
        side = "kernel" if fn.__name__ == "kernel" else "sdpa"
        seen.append(side)
        return kernel_ms if side == "kernel" else sdpa_ms

    monkeypatch.setattr(dense_route, "_elapsed_ms", elapsed)
    return seen


@pytest.mark.parametrize("kernel_ms,sdpa_ms,expected", [(1.0, 2.0, True), (2.0, 1.0, False), (1.0, 1.0, True)])
def test_faster_side_is_chosen_and_remembered(monkeypatch, kernel_ms, sdpa_ms, expected):
    q, k, v = _qkv()
    seen = _fake_clock(monkeypatch, kernel_ms, sdpa_ms)
    kw = {"block_m": 16, "block_n": 16, "backend": "torch"}
    assert dense_route.kernel_beats_sdpa(q, k, v, **kw) is expected
    assert seen == ["kernel", "sdpa"] * dense_route.REPEATS  # interleaved
    [rec] = dense_route.measurements()
    assert rec["choice"] == ("kernel" if expected else "sdpa")
    assert (rec["kernel_ms"], rec["sdpa_ms"], rec["n_q"], rec["head_dim"]) == (kernel_ms, sdpa_ms, 40, 16)
    seen.clear()
    assert dense_route.kernel_beats_sdpa(q, k, v, **kw) is expected  # remembered: not measured again
    assert seen == [] and len(dense_route.measurements()) == 1
    q2, k2, v2 = _qkv(n=56)  # another sequence length is another key
    dense_route.kernel_beats_sdpa(q2, k2, v2, **kw)
    assert len(dense_route.measurements()) == 2


def test_key_padding_is_part_of_the_key_and_used(monkeypatch):
    q, k, v = _qkv()
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[:, -5:] = False
    _fake_clock(monkeypatch, 2.0, 1.0)
    assert dense_route.kernel_beats_sdpa(q, k, v, block_m=16, block_n=16, backend="torch") is False
    assert dense_route.kernel_beats_sdpa(q, k, v, block_m=16, block_n=16, key_padding_mask=kpm,
                                         backend="torch") is False
    assert [r["key_padding"] for r in dense_route.measurements()] == [False, True]


def test_real_measurement_times_both_sides():
    """No fake clock: both sides run and are timed (CPU wall clock here; CUDA events on a GPU)."""
    q, k, v = _qkv()
    choice = dense_route.kernel_beats_sdpa(q, k, v, block_m=16, block_n=16, backend="torch")
    [rec] = dense_route.measurements()
    assert rec["kernel_ms"] > 0 and rec["sdpa_ms"] > 0 and rec["heads_timed"] == 3  # all heads of batch 0
    assert choice is (rec["kernel_ms"] <= rec["sdpa_ms"])


def test_timed_heads_fill_the_gpu_but_stay_few():
    q = torch.empty(2, 48, 17776, 1)
    assert dense_route._timed_heads(q, 128) == 2  # 139 query blocks per head: two heads give 278
    assert dense_route._timed_heads(torch.empty(1, 24, 119056, 1), 128) == 1
    assert dense_route._timed_heads(torch.empty(3, 2, 64, 1), 128) == 2  # never more heads than a batch element has
    assert dense_route._timed_heads(torch.empty(1, 8, 64, 1), 128) == dense_route.MAX_TIMED_HEADS


def test_failed_timing_falls_back_to_sdpa_and_is_logged(monkeypatch, caplog):
    q, k, v = _qkv()

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(dense_route, "_measure", broken)
    with caplog.at_level(logging.ERROR, logger="diffusers_attn.kernels.dense_route"):
        assert dense_route.kernel_beats_sdpa(q, k, v, block_m=16, block_n=16, backend="torch") is False
    [rec] = dense_route.measurements()
    assert rec["choice"] == "sdpa" and rec["error"] == "RuntimeError: boom"
    assert "boom" in caplog.text


def test_no_measurement_while_compiling(monkeypatch):
    """Tracing (or capturing a CUDA graph) cannot time anything, and SDPA routing would need a host read there."""
    q, k, v = _qkv()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _fake_clock(monkeypatch, 2.0, 1.0)  # SDPA would win a measurement
    assert dense_route.kernel_beats_sdpa(q, k, v, block_m=16, block_n=16, backend="torch") is True
    assert dense_route.measurements() == []


def test_measures_only_gpus():
    assert dense_route.measures(torch.device("cuda", 0))
    assert not dense_route.measures(torch.device("cpu"))
