"""Where dense heads of a block-sparse call run: measured once per device and shape, not assumed.

A sparse method may keep some heads dense. They can run inside the block-sparse kernel (every key block listed: no
host work, the call stays capturable in a CUDA graph) or in stock SDPA (flash / cuDNN / memory-efficient), which
needs the host to know which heads are dense (one device-to-host read per call). Which is faster depends on the
GPU, dtype, head_dim and sequence length, so :func:`kernel_beats_sdpa` times both on the call's own tensors the
first time a (device, dtype, head_dim, value dim, block sizes, query/key lengths, key padding) key is seen (a
few milliseconds; the kernel's compilation and self-check happen before the timing) and remembers the answer for
the process. The kernel is chosen only when it measured at least as fast as SDPA.

No measurement runs while a CUDA graph is captured or ``torch.compile`` traces (a timing reads the device); there
the kernel is used, the only form without a host read. The measurements are listed by :func:`measurements`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .block_format import num_blocks

__all__ = ["MEASURED_DEVICE_TYPES", "kernel_beats_sdpa", "measurements", "measures", "reset", "sdpa_dense",
           "stats_info"]

logger = logging.getLogger(__name__)

#: Device types where a measurement means something (elsewhere Triton is the interpreter: callers take SDPA).
MEASURED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: Repetitions per side (after one untimed warm-up each); the minimum of each side is compared.
REPEATS = 3
#: Heads of the call timed per side: enough query blocks to fill a large GPU, never the whole call.
MAX_TIMED_HEADS = 4
_FILL_BLOCKS = 264  # about two query blocks per SM of an H100/H200

_lock = threading.Lock()
_decisions: dict[tuple, bool] = {}
_records: list[dict[str, Any]] = []
_info: dict[str, Any] = {}  # what stats_info() returns: rebuilt when a measurement is added, not per call


def measures(device: torch.device) -> bool:
    """Whether :func:`kernel_beats_sdpa` is meaningful on ``device`` (a GPU; not the CPU interpreter)."""
    return device.type in MEASURED_DEVICE_TYPES


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
               scale: float | None) -> torch.Tensor:
    """Dense attention of heads as batched by SDPA: ``q`` (B, H, Nq, D), ``key_padding_mask`` bool (B, Nk)."""
    mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int, padded: bool) -> tuple:
    return (str(q.device), q.dtype, q.shape[-1], v.shape[-1], block_m, block_n, q.shape[2], k.shape[2], padded)


def _elapsed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()`` on ``device`` in milliseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _timed_heads(q: torch.Tensor, block_m: int) -> int:
    blocks = num_blocks(q.shape[2], block_m)
    return max(1, min(q.shape[1], MAX_TIMED_HEADS, -(-_FILL_BLOCKS // blocks)))


def _measure(q, k, v, block_m, block_n, kpm, scale, backend) -> dict[str, Any]:
    """Time the dense kernel (all key blocks listed) against SDPA on the first heads of the call."""
    from . import block_sparse_attention  # the package entry: same validation and dispatch as the real calls

    n = _timed_heads(q, block_m)
    qs, ks, vs = (x[:1, :n] for x in (q, k, v))  # views: the first heads of batch element 0
    mask = None if kpm is None else kpm[:1]
    M, K = num_blocks(q.shape[2], block_m), num_blocks(k.shape[2], block_n)
    idx = torch.arange(K, dtype=torch.int32, device=q.device).expand(1, n, M, K)
    cnt = torch.full((1, 1, 1), K, dtype=torch.int32, device=q.device).expand(1, n, M)

    def kernel() -> Any:
        return block_sparse_attention(qs, ks, vs, idx, cnt, block_m=block_m, block_n=block_n, key_padding_mask=mask,
                                      scale=scale, backend=backend)

    def sdpa() -> Any:
        return sdpa_dense(qs, ks, vs, mask, scale)

    kernel(), sdpa()  # compilation, first-use self-check, SDPA backend choice: not timed
    t_kernel, t_sdpa = [], []
    for _ in range(REPEATS):  # interleaved, so clock changes affect both sides alike
        t_kernel.append(_elapsed_ms(kernel, q.device))
        t_sdpa.append(_elapsed_ms(sdpa, q.device))
    return {"kernel_ms": min(t_kernel), "sdpa_ms": min(t_sdpa), "heads_timed": n}


def kernel_beats_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int, block_n: int,
                      key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                      backend: str = "triton") -> bool:
    """Whether dense heads of such calls should run in the block-sparse kernel (``backend``) rather than SDPA.

    Measured once per key and remembered; under CUDA-graph capture or ``torch.compile`` the remembered answer is
    not consulted and True is returned (SDPA routing needs a host read there). Never raises for a failed timing:
    the failure is logged and SDPA is used."""
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    key = _key(q, k, v, block_m, block_n, key_padding_mask is not None)
    hit = _decisions.get(key)
    if hit is not None:
        return hit
    with _lock:
        if key in _decisions:
            return _decisions[key]
        rec: dict[str, Any] = {"device": str(q.device), "dtype": str(q.dtype).removeprefix("torch."),
                               "head_dim": q.shape[-1], "n_q": q.shape[2], "n_k": k.shape[2],
                               "key_padding": key_padding_mask is not None, "backend": backend}
        try:
            with torch.no_grad():
                rec.update(_measure(q, k, v, block_m, block_n, key_padding_mask, scale, backend))
            rec["choice"] = "kernel" if rec["kernel_ms"] <= rec["sdpa_ms"] else "sdpa"
        except Exception as exc:  # noqa: BLE001  (a timing must never break the user's call)
            rec["choice"], rec["error"] = "sdpa", f"{type(exc).__name__}: {exc}"
            logger.error("diffusers-attn: timing dense heads in the %s kernel failed (%s); they run in SDPA",
                         backend, rec["error"])
        _records.append(rec)
        _info["dense_heads_measured"] = [dict(r) for r in _records]
        _decisions[key] = rec["choice"] == "kernel"
        logger.info("diffusers-attn: dense heads on %s %s head_dim %d, %d tokens: %s (%s)", rec["device"],
                    rec["dtype"], rec["head_dim"], rec["n_q"], rec["choice"],
                    rec.get("error") or f"kernel {rec['kernel_ms']:.3f} ms vs SDPA {rec['sdpa_ms']:.3f} ms")
        return _decisions[key]


def measurements() -> list[dict[str, Any]]:
    """Every dense-head measurement of this process (device, dtype, shape, both times, the choice)."""
    with _lock:
        return [dict(r) for r in _records]


def stats_info() -> dict[str, Any]:
    """``{"dense_heads_measured": [...]}`` once a measurement was made, else ``{}`` (for a method's record; the
    same dict until the next measurement, so a call copies nothing)."""
    return _info


def reset() -> None:
    """Forget every measurement (the next call of each key measures again)."""
    with _lock:
        _decisions.clear()
        _records.clear()
        _info.clear()
