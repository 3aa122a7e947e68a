"""Validation and eager dispatch of the attention operations through the backend registry.

The public entry points are in :mod:`diffusers_attn.kernels` (they add the ``torch.compile`` path); this module
registers the built-in backends: ``"torch"`` (exact reference, any device), ``"triton"`` (loaded lazily; chosen
automatically for CUDA tensors only, explicit requests also run it on CPU under ``TRITON_INTERPRET=1``) and
``"flex"`` (PyTorch FlexAttention, loaded lazily; automatic on CUDA where Triton cannot run a call). Every
attention and probe call of a fast backend passes the first-use self-check (:mod:`.selfcheck`) before it runs.
"""

from __future__ import annotations

import torch

from .._env import env_flag
from . import registry, selfcheck
from .block_format import num_blocks
from .block_select import KeyBlocks, block_topk_select_torch, key_blocks
from .reference import block_sparse_attention_torch, probe_block_mass_torch
from .registry import BLOCK_SPARSE, PROBE, SELECT, TABLE

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cuda_only(q, *rest) -> bool:
    return q.is_cuda


def _load_triton_block_sparse() -> None:
    """the 'triton' backend needs the triton package (install the 'triton' extra)"""
    from . import block_sparse_triton as bst

    registry.register_backend(BLOCK_SPARSE, "triton", bst.block_sparse_attention_triton, bst.supports,
                              auto=_cuda_only, order=0)


def _load_triton_table() -> None:
    """the 'triton' backend needs the triton package (install the 'triton' extra)"""
    from . import block_sparse_triton as bst

    def table(q, k, v, table_indices, table_counts, head_table, **kwargs):  # the kernel reads the table directly
        return bst.block_sparse_attention_triton(q, k, v, table_indices, table_counts, head_table=head_table,
                                                 **kwargs)

    registry.register_backend(TABLE, "triton", table, bst.supports, auto=_cuda_only, order=0)


def _load_triton_probe() -> None:
    """the 'triton' backend needs the triton package (install the 'triton' extra)"""
    from . import probe_triton

    registry.register_backend(PROBE, "triton", probe_triton.probe_block_mass_triton, probe_triton.supports,
                              auto=_cuda_only, order=0)


def _load_triton_select() -> None:
    """the 'triton' backend needs the triton package (install the 'triton' extra)"""
    from . import block_select_triton as bsel

    registry.register_backend(SELECT, "triton", bsel.block_topk_select_triton, bsel.supports, auto=_cuda_only,
                              order=0)


def _load_flex() -> None:
    """the 'flex' backend needs torch >= 2.5 (torch.nn.attention.flex_attention)"""
    from . import flex_backend as fb

    # Between Triton (order 0) and the PyTorch reference (order 100): on CUDA it takes every call the Triton
    # kernel does not support, instead of the slow PyTorch segment path.
    registry.register_backend(BLOCK_SPARSE, "flex", fb.block_sparse_attention_flex, fb.supports, auto=_cuda_only,
                              order=50)


def _load_flex_table() -> None:
    """the 'flex' backend needs torch >= 2.5 (torch.nn.attention.flex_attention)"""
    from . import flex_backend as fb

    registry.register_backend(TABLE, "flex", fb.block_sparse_attention_table_flex, fb.supports, auto=_cuda_only,
                              order=50)


def _register_builtin() -> None:
    registry.register_backend(BLOCK_SPARSE, "torch", block_sparse_attention_torch, order=100)
    registry.register_backend(TABLE, "torch", registry.table_from_lists(block_sparse_attention_torch), order=100)
    registry.register_backend(PROBE, "torch", probe_block_mass_torch, order=100)
    registry.register_backend(SELECT, "torch", block_topk_select_torch, order=100)
    registry.add_loader(BLOCK_SPARSE, _load_triton_block_sparse)
    registry.add_loader(TABLE, _load_triton_table)
    registry.add_loader(PROBE, _load_triton_probe)
    registry.add_loader(SELECT, _load_triton_select)
    registry.add_loader(BLOCK_SPARSE, _load_flex)
    registry.add_loader(TABLE, _load_flex_table)


_register_builtin()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class _ShapeOf:
    """dtype / shape / device of a tensor broadcast to ``shape``, without creating a view (each view is an op on
    the hot path)."""

    def __init__(self, t: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.dtype, self.device, self.shape = t.dtype, t.device, torch.Size(shape)

    def dim(self) -> int:
        return len(self.shape)


def _validate(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask, contents: bool = True) -> None:
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
    if contents and env_flag("CHECKS"):
        _check_contents(kv_indices, kv_counts, num_blocks(k.shape[2], block_n))


def _check_contents(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_k: int) -> None:
    """Index contents (costs a device sync, hence opt-in)."""
    k_max = kv_indices.shape[-1]
    _check(bool(((kv_counts >= 0) & (kv_counts <= k_max)).all()), f"kv_counts must lie in [0, K_max={k_max}]")
    valid = torch.arange(k_max, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    idx = kv_indices.long()
    _check(bool(((idx >= 0) & (idx < num_k) | ~valid).all()), f"kv_indices must lie in [0, {num_k})")
    if k_max > 1:
        inc = idx[..., 1:] > idx[..., :-1]
        _check(bool((inc | ~valid[..., 1:]).all()), "kv_indices must be strictly ascending within the count")


def block_sparse_attention_eager(q, k, v, kv_indices, kv_counts, *, block_m, block_n, key_padding_mask=None,
                                 scale=None, return_lse=False, backend=None):
    """:func:`diffusers_attn.kernels.block_sparse_attention` outside ``torch.compile`` tracing."""
    _validate(q, k, v, kv_indices, kv_counts, block_m, block_n, key_padding_mask)
    name = registry.select(BLOCK_SPARSE, (q, k, v, block_m, block_n), backend)
    name = selfcheck.resolve(BLOCK_SPARSE, name, q, v, block_m, block_n)
    return registry.backend_fn(BLOCK_SPARSE, name)(
        q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, key_padding_mask=key_padding_mask,
        scale=scale, return_lse=return_lse,
    )


def block_sparse_attention_table_eager(q, k, v, table_indices, table_counts, head_table, *, block_m, block_n,
                                       key_padding_mask=None, scale=None, return_lse=False, backend=None):
    """:func:`diffusers_attn.kernels.block_sparse_attention_table` outside ``torch.compile`` tracing."""
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
    # Validate the tensor contract as if one table row were broadcast to every head (no views, no copies).
    _validate(q, k, v, _ShapeOf(table_indices, (B, H, M, table_indices.shape[-1])), _ShapeOf(table_counts, (B, H, M)),
              block_m, block_n, key_padding_mask, contents=False)
    if env_flag("CHECKS"):
        _check_contents(table_indices, table_counts, num_blocks(k.shape[2], block_n))
        _check(bool(((head_table >= 0) & (head_table < P)).all()), f"head_table entries must lie in [0, {P})")
    name = registry.select(TABLE, (q, k, v, block_m, block_n), backend)
    name = selfcheck.resolve(TABLE, name, q, v, block_m, block_n)
    return registry.backend_fn(TABLE, name)(
        q, k, v, table_indices, table_counts, head_table, block_m=block_m, block_n=block_n,
        key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse,
    )


def select_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int, backend: str | None = None
) -> str:
    """The backend ``block_sparse_attention`` would use for these inputs (``backend`` as in that function),
    after the first-use self-check (:mod:`.selfcheck`) of the chosen one."""
    name = registry.select(BLOCK_SPARSE, (q, k, v, block_m, block_n), backend)
    return selfcheck.resolve(BLOCK_SPARSE, name, q, v, block_m, block_n)


def fast_kernel_unavailable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int
) -> str | None:
    """Why the GPU kernel cannot run these inputs (None when it can): the reason a CUDA call takes the slow
    PyTorch path, for logs and stats."""
    reason = registry.unavailable_reason(BLOCK_SPARSE, "triton", (q, k, v, block_m, block_n))
    return reason or selfcheck.failed(BLOCK_SPARSE, "triton", q, v, block_m, block_n)


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
    materialises the scores in head chunks (CPU path and oracle). ``backend``/``DIFFATTN_KERNEL`` override. A fast
    backend passes the first-use self-check (:mod:`.selfcheck`) per (device, dtype, head_dim, block_n), else the
    call runs on ``"torch"``.
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
    name = registry.select(PROBE, (q, k, block_n), backend)
    name = selfcheck.resolve(PROBE, name, q, k, None, block_n)
    return registry.backend_fn(PROBE, name)(q, k, block_n=block_n, key_padding_mask=key_padding_mask, scale=scale,
                                            token_weights=token_weights)


def selection_backend(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, backend: str | None = None) -> str:
    """The backend ``block_topk_select`` runs for these inputs (``backend`` as there), after its self-check."""
    name = registry.select(SELECT, (q, k, block_m, block_n), backend)
    return selfcheck.resolve(SELECT, name, q, k, block_m, block_n)


def _validate_select(q, k, forced, keys, row_weights, col_weights, block_m, block_n, topk, k_max) -> None:
    """Shapes only (no device op: this runs on every layer call of a method)."""
    _check(q.dim() == 4 and k.dim() == 4, f"q, k must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, N, D = q.shape
    _check(k.shape[:2] == (B, H) and k.shape[3] == D, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    _check(N > 0 and k.shape[2] > 0, "empty sequence")
    _check(q.dtype in _FLOAT_DTYPES and q.dtype == k.dtype, f"q, k must share a float dtype; got {q.dtype}, {k.dtype}")
    _check(isinstance(block_m, int) and isinstance(block_n, int) and block_m > 0 and block_n > 0,
           f"block_m and block_n must be positive ints; got {block_m!r}, {block_n!r}")
    M, K = num_blocks(N, block_m), num_blocks(k.shape[2], block_n)
    _check(isinstance(topk, int) and topk >= 0, f"topk must be an int >= 0, got {topk!r}")
    _check(isinstance(k_max, int) and 1 <= k_max <= K, f"k_max must be an int in [1, {K}], got {k_max!r}")
    _check(forced.dtype in (torch.bool, torch.uint8) and tuple(forced.shape) == (M, K),
           f"forced must be bool or uint8 (M, K) = ({M}, {K}); got {forced.dtype} {tuple(forced.shape)}")
    c = keys.counts
    _check(c.dim() == 2 and c.shape[0] in (1, B) and c.shape[1] == K and c.stride(1) == 1
           and keys.bias.shape == c.shape and keys.bias.stride() == c.stride() and keys.total.shape == c.shape[:1],
           f"keys must hold counts and bias (1 or B, K) = (1 or {B}, {K}) with unit stride over K and total "
           f"(1 or B,); got {tuple(c.shape)}, {tuple(keys.bias.shape)}, {tuple(keys.total.shape)}")
    _check(keys.weights is None or (keys.weights.dtype == torch.uint8 and tuple(keys.weights.shape) == (B, k.shape[2])),
           f"keys.weights must be None or uint8 (B, Nk) = ({B}, {k.shape[2]})")
    _check(tuple(row_weights.shape) == (M, 3) and row_weights.dtype == torch.float64 and row_weights.is_contiguous(),
           f"row_weights must be contiguous float64 (M, 3) = ({M}, 3); got {row_weights.dtype} "
           f"{tuple(row_weights.shape)}")
    _check(tuple(col_weights.shape) == (K,) and col_weights.is_floating_point() and col_weights.is_contiguous(),
           f"col_weights must be contiguous floating (K,) = ({K},); got {col_weights.dtype} {tuple(col_weights.shape)}")
    devs = {t.device for t in (q, k, forced, c, keys.bias, keys.total, row_weights, col_weights)}
    _check(len(devs) == 1, f"all tensors must be on one device; got {sorted(map(str, devs))}")


def block_topk_select(
    q: torch.Tensor,
    k: torch.Tensor,
    forced: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    topk: int,
    k_max: int,
    key_padding_mask: torch.Tensor | None = None,
    keys: KeyBlocks | None = None,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block top-k selection: per query block, its ``forced`` key blocks plus the ``topk`` best-scoring others
    (pooled q/k scores), as kernel lists and statistics (semantics: :mod:`diffusers_attn.kernels.block_select`).

    ``q`` (B, H, Nq, D), ``k`` (B, H, Nk, D) (any strides), ``forced`` bool or uint8 (M, K) shared by every head.
    ``keys``: :func:`~diffusers_attn.kernels.block_select.key_blocks` of ``key_padding_mask`` (built here when
    None; pass it to reuse it across calls). ``row_weights`` (M, 3) fp64 and ``col_weights`` (K,) weight the
    statistics (ones when None). Returns ``(kv_indices int32 (B, H, M, k_max), kv_counts int32 (B, H, M),
    stats fp64 (B, H, 4))``. Backends: ``"triton"`` (CUDA, automatic: three launches), ``"torch"`` (reference).
    """
    _check(q.dim() == 4 and k.dim() == 4, f"q, k must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if keys is None:
        if key_padding_mask is not None:
            _check(key_padding_mask.dtype == torch.bool and tuple(key_padding_mask.shape) == (q.shape[0], k.shape[2]),
                   f"key_padding_mask must be bool (B, Nk); got {key_padding_mask.dtype} "
                   f"{tuple(key_padding_mask.shape)}")
        keys = key_blocks(k.shape[2], block_n, key_padding_mask, k.device, acc)
    if row_weights is None:
        row_weights = torch.ones(num_blocks(q.shape[2], block_m), 3, dtype=torch.float64, device=q.device)
    if col_weights is None:
        col_weights = torch.ones(num_blocks(k.shape[2], block_n), dtype=keys.counts.dtype, device=q.device)
    _validate_select(q, k, forced, keys, row_weights, col_weights, block_m, block_n, topk, k_max)
    name = selection_backend(q, k, block_m, block_n, backend)
    return registry.backend_fn(SELECT, name)(q, k, forced, keys, row_weights, col_weights, block_m=block_m,
                                             block_n=block_n, topk=topk, k_max=k_max, scale=scale)
