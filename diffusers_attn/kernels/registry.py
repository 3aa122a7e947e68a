"""One backend registry for every kernel operation.

Operations (:data:`OPERATIONS`) and the arguments their backends receive:

==================================  ============================================  ==================================
operation                           ``fn(...)``                                   ``supports(...)`` / ``auto(...)``
==================================  ============================================  ==================================
``block_sparse_attention``          ``q, k, v, kv_indices, kv_counts, *,``        ``q, k, v, block_m, block_n``
                                    ``block_m, block_n, key_padding_mask,``
                                    ``scale, return_lse``
``block_sparse_attention_table``    ``q, k, v, table_indices, table_counts,``     ``q, k, v, block_m, block_n``
                                    ``head_table, *,`` (as above)
``probe_block_mass``                ``q, k, *, block_n, key_padding_mask,``       ``q, k, block_n``
                                    ``scale, token_weights``
``biwkv``                           ``k, v, w, u, *, delta, chunk``               ``k, w``
``block_topk_select``               ``q, k, forced, keys, row_weights,``          ``q, k, block_m, block_n``
                                    ``col_weights, *, block_m, block_n, topk,``
                                    ``k_max, scale``
==================================  ============================================  ==================================

A backend is ``fn`` plus ``supports`` (None when it can run a call, else the reason), ``auto`` (whether automatic
selection may take it, e.g. CUDA tensors only; an explicit request needs only ``supports``) and ``order``
(automatic selection tries backends by ascending order and takes the first allowed one that supports the call).
The request is ``backend=``, else ``$DIFFATTN_KERNEL``, else ``"auto"``. An alias is an automatic choice among a
subset (Bi-WKV's ``"torch"``: the stable PyTorch form). Optional backends (Triton) register through loaders that
run on the first query of their operation, so nothing optional is imported with the package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .._env import env_var

logger = logging.getLogger(__name__)

__all__ = [
    "OPERATIONS",
    "Backend",
    "add_loader",
    "available_backends",
    "backend_fn",
    "operation_label",
    "register_backend",
    "select",
    "table_from_lists",
    "unavailable_reason",
    "unregister_backend",
]

BLOCK_SPARSE = "block_sparse_attention"
TABLE = "block_sparse_attention_table"
PROBE = "probe_block_mass"
BIWKV = "biwkv"
SELECT = "block_topk_select"


def _always(*args) -> None:
    return None


def _yes(*args) -> bool:
    return True


@dataclass
class Backend:
    name: str
    fn: Callable
    supports: Callable[..., str | None] = _always
    auto: Callable[..., bool] = _yes
    order: float = 0


@dataclass
class _Operation:
    label: str  # how error messages name the operation
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    loaders: list[Callable[[], None]] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    loaded: bool = False


_OPS: dict[str, _Operation] = {
    BLOCK_SPARSE: _Operation("attention"),
    TABLE: _Operation("table attention"),
    # The probe has no FlexAttention form: a "flex" request (a method's kernel_backend) picks the best other one.
    PROBE: _Operation("probe", aliases={"flex": ("triton", "torch")}),
    BIWKV: _Operation("Bi-WKV", aliases={"torch": ("cumsum", "chunked")}),
    SELECT: _Operation("block selection", aliases={"flex": ("triton", "torch")}),  # no Flex form either
}
#: The operations with a registry entry.
OPERATIONS = tuple(_OPS)


def _op(op: str, load: bool = True) -> _Operation:
    spec = _OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown kernel operation {op!r}; operations: {list(_OPS)}")
    if load and not spec.loaded:
        spec.loaded = True  # first, so a loader's own register_backend calls do not re-enter
        for loader in spec.loaders:
            _run_loader(spec, loader)
    return spec


def _run_loader(spec: _Operation, loader: Callable[[], None]) -> None:
    try:
        loader()
    except ImportError as e:  # an optional dependency is missing: the other backends remain
        spec.load_errors.append(f"{loader.__doc__ or loader.__name__}: {e}")
        logger.debug("optional %s backend unavailable: %s", spec.label, e)


def add_loader(op: str, loader: Callable[[], None]) -> None:
    """Run ``loader`` (which calls :func:`register_backend`) on the first query of ``op``. An ``ImportError`` it
    raises is recorded and shown when its backend is requested, after the loader's docstring (say what to install)."""
    spec = _op(op, load=False)
    if spec.loaded:
        _run_loader(spec, loader)
    else:
        spec.loaders.append(loader)


def register_backend(
    op: str | None = None,
    name: str | Callable | None = None,
    fn: Callable | None = None,
    supports: Callable | None = None,
    *,
    auto: Callable | None = None,
    order: float | None = None,
    preferred: bool = True,
) -> None:
    """Register ``fn`` as backend ``name`` of operation ``op`` (arguments: see the module docstring).

    ``order=None`` places it before (``preferred``) or after every backend registered so far. The former
    block-sparse-only form ``register_backend(name, fn, supports, *, auto=lambda q: ..., preferred=True)`` still
    works: it registers ``fn`` for ``block_sparse_attention`` and, through per-head expansion of the tables, for
    ``block_sparse_attention_table``.
    """
    if op is None and isinstance(name, str):  # legacy, by keyword: register_backend(name=..., fn=..., ...)
        op, name = name, None
    if op not in _OPS and (name is None or callable(name)):
        _register_legacy(op, name, fn, supports, auto, preferred)
        return
    if not isinstance(name, str) or fn is None:
        raise TypeError("register_backend(op, name, fn, supports=None, *, auto=None, order=None)")
    spec = _op(op, load=order is None)  # a relative order needs the optional backends loaded first
    if order is None:
        others = [b.order for b in spec.backends.values() if b.name != name]
        order = (min(others) - 1 if preferred else max(others) + 1) if others else 0
    spec.backends[name] = Backend(name, fn, supports or _always, auto or _yes, order)


def _register_legacy(name, fn_or_none, fn, supports, auto, preferred) -> None:
    # legacy positional register_backend(name, fn, supports) arrives as (op=name, name=fn, fn=supports)
    if callable(fn_or_none):
        fn, supports = fn_or_none, fn if supports is None else supports
    auto_q = (lambda q, *rest: auto(q)) if auto is not None else None
    register_backend(BLOCK_SPARSE, name, fn, supports, auto=auto_q, preferred=preferred)
    register_backend(TABLE, name, table_from_lists(fn), supports, auto=auto_q, preferred=preferred)


def table_from_lists(fn: Callable) -> Callable:
    """A table backend running a per-head-lists backend on the tables expanded per head (a copy per head)."""

    def run(q, k, v, table_indices, table_counts, head_table, **kwargs):
        ht = head_table.long()
        return fn(q, k, v, table_indices[ht], table_counts[ht], **kwargs)

    return run


def operation_label(op: str) -> str:
    """How messages name ``op`` (e.g. ``"attention"``)."""
    return _op(op, load=False).label


def unregister_backend(op: str, name: str) -> None:
    """Remove backend ``name`` of ``op`` (a no-op when absent)."""
    _op(op).backends.pop(name, None)


def available_backends(op: str = BLOCK_SPARSE) -> list[str]:
    """Names of ``op``'s registered backends, in automatic-selection order."""
    spec = _op(op)
    return [b.name for b in sorted(spec.backends.values(), key=lambda b: b.order)]


def _unknown(op: str, spec: _Operation, name: str) -> ValueError:
    names = ["auto", *spec.aliases, *available_backends(op)]
    missing = "".join(f"; {e}" for e in spec.load_errors)
    return ValueError(f"unknown {spec.label} backend {name!r} (not registered: unknown or unavailable here); "
                      f"available: {names}{missing}")


def select(op: str, args: tuple, backend: str | None = None) -> str:
    """The backend ``op`` runs for a call with selection arguments ``args`` (see the module docstring).

    ``backend`` (else ``$DIFFATTN_KERNEL``, else ``"auto"``) names a backend, an alias or ``"auto"``. A named
    backend that cannot run the call raises ``ValueError`` with its reason; an unknown name lists the available ones.
    """
    spec = _op(op)
    requested = backend or env_var("KERNEL") or "auto"
    if requested == "auto" or requested in spec.aliases:
        pool = spec.aliases.get(requested)
        skipped = []
        for b in sorted(spec.backends.values(), key=lambda b: b.order):
            if (pool is not None and b.name not in pool) or not b.auto(*args):
                continue
            reason = b.supports(*args)
            if reason is None:
                return b.name
            skipped.append(f"{b.name}: {reason}")
            logger.debug("%s backend %s skipped: %s", spec.label, b.name, reason)
        raise ValueError(f"no {spec.label} backend can run this call automatically ({requested!r}); "
                         f"skipped: {skipped or 'none allowed'}; available: {available_backends(op)}")
    b = spec.backends.get(requested)
    if b is None:
        raise _unknown(op, spec, requested)
    reason = b.supports(*args)
    if reason is not None:
        raise ValueError(f"{spec.label} backend {requested!r} cannot run this call: {reason}")
    return requested


def backend_fn(op: str, name: str) -> Callable:
    """The function of ``op``'s backend ``name`` (as returned by :func:`select`)."""
    spec = _op(op)
    b = spec.backends.get(name)
    if b is None:
        raise _unknown(op, spec, name)
    return b.fn


def unavailable_reason(op: str, name: str, args: tuple) -> str | None:
    """Why ``op``'s backend ``name`` cannot run a call with ``args`` (None when it can), for logs and stats."""
    spec = _op(op)
    b = spec.backends.get(name)
    if b is None:
        return "; ".join(spec.load_errors) or f"the {name} backend is not registered"
    return b.supports(*args)
