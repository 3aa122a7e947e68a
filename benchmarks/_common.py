"""Timing helpers shared by the benchmark scripts (never used by tests)."""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date
from typing import Callable

import torch


def timeit(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> dict[str, float]:
    """Median / p20 / p80 milliseconds of ``fn``: CUDA events on GPU (with an L2 flush before each run),
    perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "n": len(times)}


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return env
