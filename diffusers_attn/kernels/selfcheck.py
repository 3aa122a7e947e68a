"""First-use self-check of the fast attention and probe kernels.

A kernel that has never met a user's GPU is not trusted blind: the first time a backend other than the PyTorch
reference runs an attention operation for a given (device, dtype, head_dim, value dim, block sizes), it is run on a
small synthetic problem with the same properties (strided views, tails, an empty row, key padding) and compared
with the exact PyTorch reference in fp32 (milliseconds, plus the kernel's first compilation). On a mismatch or an
exception, one error is logged with the numbers and, for the rest of the process, calls with that key fall back
to ``"flex"`` and then to the PyTorch reference (each fallback is checked the same way). The ARM probe
(``probe_block_mass``, key (device, dtype, head_dim, block_n)) is checked the same way on probe rows that are not a
multiple of a tile, a partial last key block, key padding (a straddling tail, a fully padded batch row) and 0/1
token weights, comparing the block and token masses; it has no Flex form and falls back to the PyTorch probe
(a wrong probe would silently make ARM pick wrong patterns). The block selection (``block_topk_select``, key
(device, dtype, head_dim, block_m, block_n)) runs a problem on which every implementation computes the same
scores (ternary inputs, power-of-two block tails: exact fp32 arithmetic) with tied scores, forced blocks, key
padding (a fully padded block, a partial one) and rows with fewer candidates than ``topk``: its lists and counts
must equal the reference's exactly, its stats within the tolerance. Failures are listed by
:func:`self_check_failures` (RainFusion's records put them in the stats as ``info["kernel_self_check_failures"]``, :func:`stats_info`).

``$DIFFATTN_SELF_CHECK``: ``auto`` (default: on for CUDA tensors), ``1`` (every device) or ``0`` (off).
Skipped while a CUDA graph is being captured (the comparison reads results on the host).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import torch

from .._env import env_var
from . import registry
from .block_format import block_mask_to_lists, num_blocks
from .block_select import block_topk_select_torch, key_blocks
from .reference import block_sparse_attention_torch, probe_block_mass_torch
from .registry import BLOCK_SPARSE, PROBE, SELECT, TABLE

__all__ = [
    "FALLBACKS",
    "REFERENCE",
    "TOLERANCE",
    "enabled",
    "failed",
    "failure_count",
    "reset",
    "resolve",
    "self_check_failures",
]

logger = logging.getLogger(__name__)

#: The backend everything is compared with (never checked itself).
REFERENCE = "torch"
#: Where a failed backend's calls go, in order (the first that supports the call and passes its own check).
FALLBACKS = ("flex", REFERENCE)
#: Largest accepted relative error ||out - ref|| / ||ref|| against the fp32 reference, per input dtype: a few
#: times the rounding of the dtype (fp32 leaves room for TF32 dot products).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}

_lock = threading.Lock()
_results: dict[tuple, bool] = {}
_failures: list[dict[str, Any]] = []


def enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` are self-checked (``$DIFFATTN_SELF_CHECK``: ``auto``, ``1``, ``0``)."""
    mode = (env_var("SELF_CHECK", "auto") or "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"DIFFATTN_SELF_CHECK must be 'auto', '0' or '1', got {mode!r}")
    return mode == "1" or (mode == "auto" and device.type == "cuda")


def self_check_failures() -> list[dict[str, Any]]:
    """The failed self-checks of this process (one dict per failed key, with the numbers and the fallback)."""
    with _lock:
        return [dict(f) for f in _failures]


def failure_count() -> int:
    """How many self-checks failed in this process (cheap: for per-call stats)."""
    return len(_failures)


def stats_info() -> dict[str, Any]:
    """``{"kernel_self_check_failures": [...]}`` once a check has failed, else ``{}`` (for a method's record)."""
    return {"kernel_self_check_failures": self_check_failures()} if _failures else {}


def reset() -> None:
    """Forget every check (the next call of each key is checked again)."""
    with _lock:
        _results.clear()
        _failures.clear()


def _args(op: str, q: torch.Tensor, v: torch.Tensor, block_m: int | None, block_n: int) -> tuple:
    """The registry's selection arguments of ``op`` (for the probe and the selection, ``v`` is ``k``)."""
    if op == SELECT:
        return (q, v, block_m, block_n)
    return (q, v, block_n) if op == PROBE else (q, q, v, block_m, block_n)


def _key(op, name, q, v, block_m, block_n) -> tuple:
    # The probe and the selection have no values (the probe no query blocks either).
    dv = None if op in (PROBE, SELECT) else v.shape[-1]
    return (op, name, str(q.device), q.dtype, q.shape[-1], dv, block_m, block_n)


def resolve(op: str, name: str, q: torch.Tensor, v: torch.Tensor, block_m: int | None, block_n: int) -> str:
    """The backend to run instead of ``name`` for ``op`` (``name`` itself unless its self-check failed).

    For ``probe_block_mass`` pass ``k`` as ``v`` and ``block_m=None``; for ``block_topk_select`` ``k`` as ``v``."""
    if name == REFERENCE or op not in (BLOCK_SPARSE, TABLE, PROBE, SELECT) or not enabled(q.device):
        return name
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return name
    key = _key(op, name, q, v, block_m, block_n)
    ok = _results.get(key)
    if ok is None:
        ok = _check(key, op, name, q, v, block_m, block_n)
    if ok:
        return name
    for alt in FALLBACKS:
        runs = alt != name and registry.unavailable_reason(op, alt, _args(op, q, v, block_m, block_n)) is None
        if runs and resolve(op, alt, q, v, block_m, block_n) == alt:
            return alt
    return REFERENCE


def failed(op: str, name: str, q: torch.Tensor, v: torch.Tensor, block_m: int | None, block_n: int) -> str | None:
    """Why ``name`` does not run such calls because of a failed self-check (None when it has not failed)."""
    if _results.get(_key(op, name, q, v, block_m, block_n)) is False:
        return f"the {name} kernel failed its first-use self-check on {q.device} {q.dtype} head_dim {q.shape[-1]}"
    return None


def _problem(device, dtype, D, Dv, block_m, block_n):
    """A small problem with tails, an empty query block, key padding and BSHD strides (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    B, H = 2, 2
    n_q, n_k = 2 * block_m + block_m // 2, 3 * block_n + block_n // 2

    def mk(n, d):  # BSHD storage viewed as BHSD, as the adapters pass it
        return torch.randn(B, n, H, d, generator=g).to(device, dtype).transpose(1, 2)

    q, k, v = mk(n_q, D), mk(n_k, D), mk(n_k, Dv)
    mask = torch.rand(B, H, num_blocks(n_q, block_m), num_blocks(n_k, block_n), generator=g) < 0.6
    mask[..., 0, 0] = True
    mask[0, 1, 1] = False  # an empty query block: zeros, never NaN
    idx, cnt = (t.to(device) for t in block_mask_to_lists(mask))
    kpm = torch.ones(B, n_k, dtype=torch.bool)
    kpm[1, n_k - block_n // 2 - 3 :] = False  # a padded tail straddling a block
    return q, k, v, idx, cnt, kpm.to(device)


def _errors(op, name, device, dtype, D, Dv, block_m, block_n) -> tuple[float, float]:
    """(max abs error, relative error) of backend ``name`` on the small problem, with and without key padding."""
    qc, kc, vc, idx, cnt, kpm = _problem(device, dtype, D, Dv, block_m, block_n)
    fn = registry.backend_fn(op, name)
    kw = {"block_m": block_m, "block_n": block_n, "scale": 1.0 / math.sqrt(D), "return_lse": False}
    errors = []
    for pad in (kpm, None):
        if op == TABLE:  # one pattern table per head slot; head (b, h) reads row b * H + h
            B, H = qc.shape[:2]
            head_table = torch.arange(B * H, dtype=torch.int32, device=device).view(B, H)
            out = fn(qc, kc, vc, idx.flatten(0, 1), cnt.flatten(0, 1), head_table, key_padding_mask=pad, **kw)
        else:
            out = fn(qc, kc, vc, idx, cnt, key_padding_mask=pad, **kw)
        ref = block_sparse_attention_torch(
            qc.float(), kc.float(), vc.float(), idx, cnt, key_padding_mask=pad, impl="math", **kw
        )
        diff = (out.float() - ref).nan_to_num(nan=math.inf)
        errors.append((float(diff.abs().max()), float(diff.norm() / ref.norm().clamp_min(1e-30))))
    return max(e[0] for e in errors), max(e[1] for e in errors)


def _probe_problem(device, dtype, D, block_n):
    """A small probe problem: P not a multiple of a probe tile, a partial last key block, BSHD strides, key padding
    (a tail straddling a block, a fully padded first block, a batch row with no valid key) and 0/1 token weights."""
    g = torch.Generator().manual_seed(1234)
    B, H, P = 3, 2, 21
    n_k = 3 * block_n + block_n // 2

    def mk(n):  # BSHD storage viewed as BHSD, as the adapters pass it
        return torch.randn(B, n, H, D, generator=g).to(device, dtype).transpose(1, 2)

    q, k = mk(P), mk(n_k)
    kpm = torch.ones(B, n_k, dtype=torch.bool)
    kpm[0, :block_n] = False  # a key block with no mass
    kpm[1, n_k - block_n // 2 - 3 :] = False  # a padded tail straddling a block
    kpm[2] = False  # no valid key: rows of zeros, never NaN
    tw = (torch.rand(n_k, generator=g) < 0.5).float()
    return q, k, kpm.to(device), tw.to(device)


def _probe_errors(name, device, dtype, D, block_n) -> tuple[float, float]:
    """(max abs error, relative error) of probe backend ``name`` over the block and token masses, with padding and
    token weights (default scale), and without either (another scale)."""
    qc, kc, kpm, tw = _probe_problem(device, dtype, D, block_n)
    fn = registry.backend_fn(PROBE, name)
    errors = []
    for pad, weights, scale in ((kpm, tw, None), (None, None, 0.7 / math.sqrt(D))):
        kw = {"block_n": block_n, "key_padding_mask": pad, "scale": scale, "token_weights": weights}
        mass, tmass = fn(qc, kc, **kw)
        ref, ref_t = probe_block_mass_torch(qc.float(), kc.float(), **kw)
        pairs = [(mass, ref)]
        if weights is not None:
            if tmass is None:
                raise ValueError("returned no token mass for token_weights")
            pairs.append((tmass, ref_t))
        for got, want in pairs:
            if got.shape != want.shape:
                raise ValueError(f"returned shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            diff = (got.float() - want).nan_to_num(nan=math.inf)
            errors.append((float(diff.abs().max()), float(diff.norm() / want.norm().clamp_min(1e-30))))
    return max(e[0] for e in errors), max(e[1] for e in errors)


def _select_problem(device, dtype, D, block_m, block_n):
    """A small selection problem computed exactly by any implementation: ternary q/k (block sums and dots are
    exact in fp32), block tails of block_n // 2 keys and queries (powers of two when the block sizes are), three
    identical key blocks (tied scores), key padding (a fully padded block, a partial tail of a power-of-two
    count), a forced column and a forced row, integer weights."""
    g = torch.Generator().manual_seed(1234)
    B, H = 2, 2
    n = 3 * block_m + 4 * block_n + max(1, block_n // 2)

    def mk():  # BSHD storage viewed as BHSD, as the adapters pass it
        return torch.randint(-1, 2, (B, n, H, D), generator=g).to(dtype).transpose(1, 2)

    q, k = mk(), mk()
    K = num_blocks(n, block_n)
    k[:, :, 2 * block_n : 4 * block_n] = k[:, :, block_n : 2 * block_n].repeat(1, 1, 2, 1)  # blocks 1-3 tie
    M = num_blocks(n, block_m)
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[0, block_n : 2 * block_n] = False  # a fully padded key block: never listed
    kpm[1, n - max(1, (n - (K - 1) * block_n) // 2) :] = False  # half of the last block
    forced = torch.zeros(M, K, dtype=torch.bool)
    forced[:, 0] = True
    forced[M - 1] = True
    rw = torch.randint(1, 9, (M, 3), generator=g).double()
    cw = torch.randint(0, 9, (K,), generator=g).float()
    return q.to(device), k.to(device), kpm.to(device), forced.to(device), rw.to(device), cw.to(device)


def _select_errors(name, device, dtype, D, block_m, block_n) -> tuple[float, float]:
    """(max abs error, relative error) of selection backend ``name``'s stats, for top-k of 0, 2 and every block
    (rows with fewer candidates); raises if its lists or counts differ from the reference's at all."""
    q, k, kpm, forced, rw, cw = _select_problem(device, dtype, D, block_m, block_n)
    fn = registry.backend_fn(SELECT, name)
    K = forced.shape[1]
    keys = key_blocks(k.shape[2], block_n, kpm, device)
    errors = []
    for topk in (0, 2, K):
        kw = {"block_m": block_m, "block_n": block_n, "topk": topk, "k_max": K, "scale": None}
        idx, cnt, stats = fn(q, k, forced, keys, rw, cw, **kw)
        ref_idx, ref_cnt, ref = block_topk_select_torch(q, k, forced, keys, rw, cw, **kw)
        if idx.shape != ref_idx.shape or cnt.shape != ref_cnt.shape or stats.shape != ref.shape:
            raise ValueError(f"returned shapes {tuple(idx.shape)}, {tuple(cnt.shape)}, {tuple(stats.shape)}")
        bad = (idx != ref_idx).any(-1) | (cnt != ref_cnt)
        if bool(bad.any()):
            raise ValueError(f"returned different block lists in {int(bad.sum())} of {bad.numel()} rows (topk {topk})")
        diff = (stats.double() - ref).nan_to_num(nan=math.inf)
        errors.append((float(diff.abs().max()), float(diff.norm() / ref.norm().clamp_min(1e-30))))
    return max(e[0] for e in errors), max(e[1] for e in errors)


def _check(key, op, name, q, v, block_m, block_n) -> bool:
    dtype, D, Dv = q.dtype, q.shape[-1], key[5]
    tol = TOLERANCE.get(dtype, 2e-3)
    try:
        if op == PROBE:
            max_abs, rel = _probe_errors(name, q.device, dtype, D, block_n)
        elif op == SELECT:
            max_abs, rel = _select_errors(name, q.device, dtype, D, block_m, block_n)
        else:
            max_abs, rel = _errors(op, name, q.device, dtype, D, Dv, block_m, block_n)
        ok = rel <= tol
        detail = f"max abs error {max_abs:.3g}, relative error {rel:.3g} (tolerance {tol:g})"
    except Exception as e:  # noqa: BLE001 -- a kernel that cannot run the small problem is as untrustworthy
        ok, max_abs, rel = False, math.nan, math.nan
        detail = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with _lock:
        _results[key] = ok
    if ok:
        return True
    args = _args(op, q, v, block_m, block_n)
    fallback = next((a for a in FALLBACKS if a != name and registry.unavailable_reason(op, a, args) is None), REFERENCE)
    record = {
        "operation": op,
        "backend": name,
        "device": key[2],
        "dtype": str(dtype).removeprefix("torch."),
        "head_dim": D,
        "value_dim": Dv,
        "block_m": block_m,
        "block_n": block_n,
        "max_abs_error": max_abs,
        "relative_error": rel,
        "tolerance": tol,
        "fallback": fallback,
    }
    with _lock:
        _failures.append(record)
    blocks = f"block_n {block_n}" if block_m is None else f"blocks {block_m}x{block_n}"
    logger.error(
        "diffusers-attn: the %r %s kernel FAILED its first-use self-check on %s %s head_dim %d (%s) "
        "against the fp32 PyTorch reference: %s. Falling back to %r for the rest of this process "
        "(DIFFATTN_SELF_CHECK=0 disables the check).",
        name,
        registry.operation_label(op),
        key[2],
        record["dtype"],
        D,
        blocks,
        detail,
        fallback,
    )
    return False
