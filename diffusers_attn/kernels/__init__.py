"""Attention kernels: one validated entry point per operation, dispatching to a backend.

``block_sparse_attention`` is the contract every sparse method in this package executes through:

* ``q`` (B, H, Nq, D), ``k`` (B, H, Nk, D), ``v`` (B, H, Nk, Dv): any strides (views of BSHD tensors are fine).
* ``kv_indices`` int32 (B, H, ceil(Nq / block_m), K_max), ``kv_counts`` int32 (B, H, ceil(Nq / block_m)):
  query block ``i`` attends exactly to the keys of blocks ``kv_indices[b, h, i, :kv_counts[b, h, i]]``
  (ascending, no duplicates), minus padded keys. Broadcast views (``expand``) are accepted.
* ``key_padding_mask`` bool (B, Nk), True = valid key.
* A query row that sees no valid key returns zeros (and ``lse = -inf``), never NaN.

Backends: ``"torch"`` (exact chunked reference, any device) and, when registered, faster kernels. ``backend=None``
picks automatically; the environment variable ``DIFFUSERS_ATTN_KERNEL`` (``torch`` / ``triton`` / ``auto``)
overrides the automatic choice for debugging. Set ``DIFFUSERS_ATTN_CHECKS=1`` to also validate index contents
(costs a device sync).

This package has no model knowledge and never imports Triton at import time.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from .block_format import (
    block_mask_to_lists,
    expand_block_mask,
    lists_to_block_mask,
    lists_to_token_mask,
    num_blocks,
)
from .reference import block_sparse_attention_torch, masked_attention_reference, probe_block_mass_torch

logger = logging.getLogger(__name__)

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_table",
    "probe_block_mass",
    "select_backend",
    "fast_kernel_unavailable",
    "available_backends",
    "register_backend",
    "block_mask_to_lists",
    "lists_to_block_mask",
    "lists_to_token_mask",
    "expand_block_mask",
    "num_blocks",
    "block_sparse_attention_torch",
    "masked_attention_reference",
    "probe_block_mass_torch",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# name -> (function, supports(q, k, v, block_m, block_n) -> reason-or-None, auto(q) -> bool)
_BACKENDS: dict[str, tuple[Callable, Callable, Callable]] = {
    "torch": (block_sparse_attention_torch, lambda *a: None, lambda q: True),
}
_AUTO_ORDER: list[str] = ["torch"]


def register_backend(
    name: str, fn: Callable, supports: Callable, *, auto: Callable = lambda q: True, preferred: bool = True
) -> None:
    """Register a kernel backend. ``supports(q, k, v, block_m, block_n)`` returns None or a reason string;
    ``auto(q)`` says whether automatic selection may pick it (explicit requests only need ``supports``)."""
    _BACKENDS[name] = (fn, supports, auto)
    if name not in _AUTO_ORDER:
        if preferred:
            _AUTO_ORDER.insert(0, name)
        else:
            _AUTO_ORDER.append(name)


def available_backends() -> list[str]:
    """Names of the registered backends, in automatic-selection order."""
    _load_optional_backends()
    return list(_AUTO_ORDER)


_optional_loaded = False
_optional_error: str | None = None


def _load_optional_backends() -> None:
    global _optional_loaded, _optional_error
    if _optional_loaded:
        return
    _optional_loaded = True
    try:
        from . import block_sparse_triton as bst
    except ImportError as e:  # Triton missing: the torch path remains
        _optional_error = f"triton is not importable ({e}); install the 'triton' extra"
        logger.debug("triton block-sparse backend unavailable: %s", e)
        return
    # Automatic selection takes the kernel on CUDA only; on CPU it runs when asked for (interpreter tests).
    register_backend("triton", bst.block_sparse_attention_triton, bst.supports, auto=lambda q: q.is_cuda)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _validate(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask) -> None:
    _check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        f"q, k, v must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    B, H, n_q, D = q.shape
    _check(
        k.shape[:2] == (B, H) and v.shape[:2] == (B, H),
        f"batch/head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}",
    )
    _check(k.shape[2] == v.shape[2], f"k and v sequence lengths differ: {k.shape[2]} vs {v.shape[2]}")
    _check(k.shape[3] == D, f"q and k head_dim differ: {D} vs {k.shape[3]}")
    _check(n_q > 0 and k.shape[2] > 0, "empty sequence")
    _check(
        q.dtype in _FLOAT_DTYPES and q.dtype == k.dtype == v.dtype,
        f"q, k, v must share one of {[str(d) for d in _FLOAT_DTYPES]}; got {q.dtype}, {k.dtype}, {v.dtype}",
    )
    _check(q.device == k.device == v.device, "q, k, v must be on the same device")
    _check(
        isinstance(block_m, int) and isinstance(block_n, int) and block_m > 0 and block_n > 0,
        f"block_m and block_n must be positive ints; got {block_m!r}, {block_n!r}",
    )
    num_m = num_blocks(n_q, block_m)
    _check(
        kv_indices.dtype == torch.int32 and kv_counts.dtype == torch.int32,
        f"kv_indices and kv_counts must be int32; got {kv_indices.dtype}, {kv_counts.dtype}",
    )
    _check(
        kv_indices.dim() == 4 and tuple(kv_indices.shape[:3]) == (B, H, num_m) and kv_indices.shape[3] >= 1,
        f"kv_indices must be (B, H, ceil(Nq/block_m), K_max) = ({B}, {H}, {num_m}, K_max); "
        f"got {tuple(kv_indices.shape)}",
    )
    _check(
        tuple(kv_counts.shape) == (B, H, num_m),
        f"kv_counts must be (B, H, ceil(Nq/block_m)) = ({B}, {H}, {num_m}); got {tuple(kv_counts.shape)}",
    )
    _check(kv_indices.device == q.device and kv_counts.device == q.device, "block lists must be on q's device")
    if key_padding_mask is not None:
        _check(
            key_padding_mask.dtype == torch.bool and tuple(key_padding_mask.shape) == (B, k.shape[2]),
            f"key_padding_mask must be bool (B, Nk) = ({B}, {k.shape[2]}); got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}",
        )
        _check(key_padding_mask.device == q.device, "key_padding_mask must be on q's device")
    if os.environ.get("DIFFUSERS_ATTN_CHECKS", "0") == "1":
        num_k = num_blocks(k.shape[2], block_n)
        k_max = kv_indices.shape[-1]
        _check(
            bool(((kv_counts >= 0) & (kv_counts <= k_max)).all()),
            f"kv_counts must lie in [0, K_max={k_max}]",
        )
        valid = torch.arange(k_max, device=q.device) < kv_counts.unsqueeze(-1)
        idx = kv_indices.long()
        _check(bool(((idx >= 0) & (idx < num_k) | ~valid).all()), f"kv_indices must lie in [0, {num_k})")
        if k_max > 1:
            inc = idx[..., 1:] > idx[..., :-1]
            _check(bool((inc | ~valid[..., 1:]).all()), "kv_indices must be strictly ascending within the count")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention (see the module docstring for the contract).

    Returns ``out`` (B, H, Nq, Dv) in ``q.dtype``; with ``return_lse`` also the fp32 log-sum-exp (B, H, Nq).
    Under ``torch.compile`` this is the custom op ``diffusers_attn::block_sparse_attention`` (no graph break).
    """
    if torch.compiler.is_compiling():
        from ..ops import block_sparse_attention_op

        out, lse = block_sparse_attention_op(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask,
                                             scale, return_lse, backend or "auto")
        return (out, lse) if return_lse else out
    _validate(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask)
    name = _select_backend(q, k, v, block_m, block_n, backend)
    fn = _BACKENDS[name][0]
    return fn(
        q,
        k,
        v,
        kv_indices,
        kv_counts,
        block_m=block_m,
        block_n=block_n,
        key_padding_mask=key_padding_mask,
        scale=scale,
        return_lse=return_lse,
    )


def _select_backend(q, k, v, block_m, block_n, backend: str | None) -> str:
    _load_optional_backends()
    requested = backend or os.environ.get("DIFFUSERS_ATTN_KERNEL", "auto")
    if requested != "auto":
        if requested not in _BACKENDS:
            raise ValueError(
                f"unknown or unavailable attention backend {requested!r}; available: {available_backends()}"
            )
        reason = _BACKENDS[requested][1](q, k, v, block_m, block_n)
        if reason is not None:
            raise ValueError(f"backend {requested!r} cannot run this call: {reason}")
        return requested
    for name in _AUTO_ORDER:
        if not _BACKENDS[name][2](q):
            continue
        reason = _BACKENDS[name][1](q, k, v, block_m, block_n)
        if reason is None:
            return name
        logger.debug("backend %s skipped: %s", name, reason)
    return "torch"


def fast_kernel_unavailable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int
) -> str | None:
    """Why the GPU kernel cannot run these inputs (None when it can): the reason a CUDA call takes the slow
    PyTorch path, for logs and stats."""
    _load_optional_backends()
    if "triton" not in _BACKENDS:
        return _optional_error or "the triton backend is not registered"
    return _BACKENDS["triton"][1](q, k, v, block_m, block_n)


def select_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int, backend: str | None = None
) -> str:
    """The backend ``block_sparse_attention`` would use for these inputs (``backend`` as in that function)."""
    return _select_backend(q, k, v, block_m, block_n, backend)


def block_sparse_attention_table(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table_indices: torch.Tensor,
    table_counts: torch.Tensor,
    head_table: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with compact per-pattern lists: head (b, h) uses ``table_indices[head_table[b, h]]``
    (P, M, K_max) and ``table_counts[head_table[b, h]]`` (P, M). Same semantics as :func:`block_sparse_attention`
    with the lists expanded per head, without materializing them (the Triton kernel reads the table directly)."""
    if torch.compiler.is_compiling():
        from ..ops import block_sparse_attention_table_op

        return block_sparse_attention_table_op(q, k, v, table_indices, table_counts, head_table, block_m, block_n,
                                               key_padding_mask, scale, backend or "auto")
    B, H = q.shape[:2]
    _check(
        head_table.dtype == torch.int32 and tuple(head_table.shape) == (B, H),
        f"head_table must be int32 (B, H) = ({B}, {H}); got {head_table.dtype} {tuple(head_table.shape)}",
    )
    _check(
        table_indices.dim() == 3 and table_counts.dim() == 2 and table_indices.shape[:2] == table_counts.shape,
        f"tables must be (P, M, K_max) and (P, M); got {tuple(table_indices.shape)}, {tuple(table_counts.shape)}",
    )
    P, M = table_counts.shape
    # Validate the tensor contract on broadcast views of one table row (cheap, no copies).
    _validate(q, k, v, table_indices[0].expand(B, H, M, -1), table_counts[0].expand(B, H, M), block_m, block_n,
              key_padding_mask)
    if os.environ.get("DIFFUSERS_ATTN_CHECKS", "0") == "1":
        _check(bool(((head_table >= 0) & (head_table < P)).all()), f"head_table entries must lie in [0, {P})")
    name = _select_backend(q, k, v, block_m, block_n, backend)
    if name == "triton":
        from .block_sparse_triton import block_sparse_attention_triton

        return block_sparse_attention_triton(
            q, k, v, table_indices, table_counts, block_m=block_m, block_n=block_n,
            key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse, head_table=head_table,
        )
    ht = head_table.long()
    return _BACKENDS[name][0](
        q, k, v, table_indices[ht], table_counts[ht], block_m=block_m, block_n=block_n,
        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


def probe_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    token_weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax mass of probe query rows per key block: the primitive behind sparse-mask predictors.

    ``q`` (B, H, P, D) holds P probe rows (already gathered), ``k`` (B, H, N, D) all keys (strided views fine),
    ``key_padding_mask`` bool (B, N) (True = valid). For each row, the exact softmax of ``q k^T * scale`` over the
    valid keys (fp32 accumulation) is summed per key block of ``block_n`` tokens: ``block_mass`` (B, H, P,
    ceil(N / block_n)) fp32, each row summing to 1 (0 for a row with no valid key). With ``token_weights`` (N,)
    also ``token_mass`` (B, H, P) = sum_j p_j * token_weights[j] (e.g. a 0/1 token mask), else None.

    Backends: ``"triton"`` (CUDA, automatic) streams the keys twice and writes only the block masses; ``"torch"``
    materialises the scores in head chunks (CPU path and oracle). ``backend``/``DIFFUSERS_ATTN_KERNEL`` override.
    """
    _check(q.dim() == 4 and k.dim() == 4, f"q, k must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, P, D = q.shape
    _check(k.shape[:2] == (B, H) and k.shape[3] == D, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    _check(P > 0 and k.shape[2] > 0, "empty probe or key set")
    _check(q.dtype in _FLOAT_DTYPES and q.dtype == k.dtype, f"q, k must share a float dtype; got {q.dtype}, {k.dtype}")
    _check(q.device == k.device, "q and k must be on the same device")
    _check(isinstance(block_n, int) and block_n > 0, f"block_n must be a positive int, got {block_n!r}")
    N = k.shape[2]
    if key_padding_mask is not None:
        _check(
            key_padding_mask.dtype == torch.bool and tuple(key_padding_mask.shape) == (B, N)
            and key_padding_mask.device == q.device,
            f"key_padding_mask must be bool (B, N) = ({B}, {N}) on q's device; got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}",
        )
    if token_weights is not None:
        _check(
            token_weights.dim() == 1 and token_weights.shape[0] == N and token_weights.device == q.device,
            f"token_weights must be (N,) = ({N},) on q's device; got {tuple(token_weights.shape)}",
        )
    requested = backend or os.environ.get("DIFFUSERS_ATTN_KERNEL", "auto")
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown probe backend {requested!r}; available: 'auto', 'torch', 'triton'")
    use_triton = False
    if requested != "torch":
        try:
            from . import probe_triton
        except ImportError as e:
            if requested == "triton":
                raise ValueError(f"backend 'triton' is unavailable: {e}") from None
        else:
            reason = probe_triton.supports(q, k, block_n)
            if requested == "triton" and reason is not None:
                raise ValueError(f"backend 'triton' cannot run this probe: {reason}")
            use_triton = reason is None and (requested == "triton" or q.is_cuda)
    fn = probe_triton.probe_block_mass_triton if use_triton else probe_block_mass_torch
    return fn(q, k, block_n=block_n, key_padding_mask=key_padding_mask, scale=scale, token_weights=token_weights)


# Bi-WKV (FEAT's linear-time mixer): dispatch CUDA -> Triton, else the stable PyTorch form; see kernels/biwkv.py.
from .biwkv import biwkv, biwkv_chunked, biwkv_cumsum, biwkv_reference, select_biwkv_backend  # noqa: E402

__all__ += ["biwkv", "biwkv_chunked", "biwkv_cumsum", "biwkv_reference", "select_biwkv_backend"]
