"""PyTorch FlexAttention as the ``"flex"`` backend of the block-sparse contract.

The project's lists become a ``BlockMask`` whose *full* blocks are the listed key blocks without padded keys and
whose *partial* blocks are the listed blocks that straddle the key padding (fully padded blocks are dropped). The
``mask_mod`` encodes the listed blocks and the padding as well, because eager FlexAttention evaluates it over the
whole score matrix and ignores the lists; the compiled kernel evaluates it on partial blocks only. BlockMasks are
cached per plan (the list tensors' identity, version and shape), and ``kernel_options`` make the kernel tiles divide
the list block sizes (FlexAttention's default 128-wide key tile does not divide 64-wide key blocks).

``$DIFFATTN_FLEX_COMPILE``: ``auto`` (default; compiled on CUDA, eager elsewhere), ``1`` (always compiled; static
shapes on CPU, where dynamic-shape compilation of FlexAttention is broken) or ``0`` (always eager: materializes
the full score matrix, for debugging and small CPU tests). Inside a compiled graph (the package's custom op under
``torch.compile``) eager FlexAttention cannot run (functorch is off there): with compilation off, such calls run
on the PyTorch reference. Compiled CPU FlexAttention cannot return the LSE: such calls run eagerly (inside a
compiled graph: on the PyTorch reference).

Imported lazily (the first query of a block-sparse operation); needs torch >= 2.5.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .._env import env_var
from .block_format import lists_to_block_mask, num_blocks
from .reference import block_sparse_attention_torch

__all__ = [
    "block_sparse_attention_flex",
    "block_sparse_attention_table_flex",
    "build_block_mask",
    "clear_cache",
    "compile_mode",
    "kernel_options",
    "supports",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# BlockMasks kept per process. Each entry holds its list tensors alive, so a cached address can never be reused
# by another tensor while the entry exists (identity + version is then an exact key).
_CACHE_SIZE = 64
_cache: OrderedDict[tuple, tuple[BlockMask, tuple]] = OrderedDict()
_lock = threading.Lock()
_compiled: dict[str, Callable] = {}


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> str | None:
    """None if FlexAttention can run this call, else the reason."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if not (16 <= q.shape[-1] <= 256 and 16 <= v.shape[-1] <= 256):
        return f"head_dim {q.shape[-1]} / value dim {v.shape[-1]} (supported: 16 to 256)"
    if block_m % 16 or block_n % 16:
        return f"block sizes {block_m}x{block_n} (supported: multiples of 16)"
    return None


def compile_mode(device: torch.device) -> bool:
    """Whether FlexAttention runs compiled on ``device`` (``$DIFFATTN_FLEX_COMPILE``: ``auto``, ``1``, ``0``)."""
    mode = (env_var("FLEX_COMPILE", "auto") or "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"DIFFATTN_FLEX_COMPILE must be 'auto', '0' or '1', got {mode!r}")
    return mode == "1" or (mode == "auto" and device.type == "cuda")


def _tile(block: int) -> int:
    """The largest power of two <= 128 dividing ``block`` (the kernel tile must divide the list block)."""
    t = 128
    while block % t:
        t //= 2
    return t


def kernel_options(block_m: int, block_n: int, device: torch.device) -> dict | None:
    """FlexAttention ``kernel_options`` whose tiles divide the list block sizes (None on CPU: the C++ kernel
    picks its own blocking)."""
    if device.type != "cuda":
        return None
    return {"BLOCK_M": _tile(block_m), "BLOCK_N": _tile(block_n)}


def _flex_fn(device: torch.device) -> Callable:
    if not compile_mode(device):
        return flex_attention
    fn = _compiled.get(device.type)
    if fn is None:
        # CPU: static shapes (dynamic-shape FlexAttention compilation fails on CPU in torch 2.13).
        fn = _compiled[device.type] = torch.compile(flex_attention, dynamic=False if device.type == "cpu" else None)
    return fn


def _fingerprint(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    # Inference tensors have no version counter: an in-place edit of one between calls is not detected (the
    # package never edits lists in place; they are rebuilt per plan).
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, version)


def clear_cache() -> None:
    """Drop every cached BlockMask."""
    with _lock:
        _cache.clear()


def _compact(sel: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of ``idx`` (ascending) where ``sel``, moved to the front in order: (counts, indices), on device."""
    slot = torch.arange(idx.shape[-1], device=idx.device)
    order = torch.where(sel, slot, slot + idx.shape[-1]).argsort(dim=-1, stable=True)
    return sel.sum(-1, dtype=torch.int32), torch.gather(idx, -1, order).to(torch.int32).contiguous()


def _unbroadcast(t: torch.Tensor) -> torch.Tensor:
    """Collapse batch/head dims that are broadcast views (stride 0) to size 1."""
    if t.shape[0] > 1 and t.stride(0) == 0:
        t = t[:1]
    if t.shape[1] > 1 and t.stride(1) == 0:
        t = t[:, :1]
    return t


def build_block_mask(
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    n_q: int,
    n_k: int,
    block_m: int,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
    head_table: torch.Tensor | None = None,
) -> BlockMask:
    """The FlexAttention ``BlockMask`` for the project's lists (cached; see the module docstring).

    ``kv_indices`` (B, H, M, K_max) / ``kv_counts`` (B, H, M), or with ``head_table`` (B, H) per-pattern tables
    (P, M, K_max) / (P, M). Built with device ops only (no host sync)."""
    key = (
        _fingerprint(kv_indices),
        _fingerprint(kv_counts),
        _fingerprint(head_table),
        _fingerprint(key_padding_mask),
        n_q,
        n_k,
        block_m,
        block_n,
    )
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit[0]
    bm = _build(kv_indices, kv_counts, n_q, n_k, block_m, block_n, key_padding_mask, head_table)
    with _lock:
        _cache[key] = (bm, (kv_indices, kv_counts, head_table, key_padding_mask))
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return bm


def _build(kv_indices, kv_counts, n_q, n_k, block_m, block_n, key_padding_mask, head_table) -> BlockMask:
    dev = kv_indices.device
    num_k = num_blocks(n_k, block_n)
    if head_table is not None:  # per-pattern tables: lists per (b, h) by gather, membership per pattern
        B, H = head_table.shape
        mem_row = head_table.long()
        idx, cnt = kv_indices[mem_row], kv_counts[mem_row]  # (B, H, M, K_max), (B, H, M)
        member = lists_to_block_mask(kv_indices, kv_counts, num_k)  # (P, M, num_k)
    else:
        B, H = kv_indices.shape[:2]
        idx, cnt = _unbroadcast(kv_indices), _unbroadcast(kv_counts)  # BlockMask broadcasts size-1 dims
        bb, hh = idx.shape[:2]
        member = lists_to_block_mask(idx, cnt, num_k).reshape(bb * hh, idx.shape[2], num_k)
        mem_row = torch.arange(bb * hh, device=dev).view(bb, hh).expand(B, H).contiguous()
    idx = idx.long()
    listed = torch.arange(idx.shape[-1], device=dev) < cnt.unsqueeze(-1)
    if key_padding_mask is None:
        full_cnt, full_idx = _compact(listed, idx)
        part_cnt, part_idx = torch.zeros_like(full_cnt), torch.zeros_like(full_idx[..., :1])

        def mask_mod(b, h, q_idx, kv_idx):
            return member[mem_row[b, h], q_idx // block_m, kv_idx // block_n]
    else:
        pad = num_k * block_n - n_k
        # Tail keys past n_k count as valid for "full": FlexAttention bounds-checks the last block itself.
        blk_all = F.pad(key_padding_mask, (0, pad), value=True).view(B, num_k, block_n).all(-1)
        blk_any = F.pad(key_padding_mask, (0, pad), value=False).view(B, num_k, block_n).any(-1)
        idx = idx.expand(B, *idx.shape[1:])
        listed = listed.expand(B, *listed.shape[1:])
        flat = idx.reshape(B, -1)
        is_full = torch.gather(blk_all, 1, flat).view(idx.shape) & listed
        is_any = torch.gather(blk_any, 1, flat).view(idx.shape) & listed  # fully padded blocks are dropped
        full_cnt, full_idx = _compact(is_full, idx)
        part_cnt, part_idx = _compact(is_any & ~is_full, idx)
        kpm = key_padding_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return member[mem_row[b, h], q_idx // block_m, kv_idx // block_n] & kpm[b, kv_idx]

    if dev.type == "cpu":  # the CPU kernel reads the key length off the list width (the GPU one only strides)
        full_idx, part_idx = (F.pad(t, (0, num_k - t.shape[-1])) for t in (full_idx, part_idx))
    return BlockMask.from_kv_blocks(
        part_cnt,
        part_idx,
        full_cnt,
        full_idx,
        BLOCK_SIZE=(block_m, block_n),
        mask_mod=mask_mod,
        seq_lengths=(n_q, n_k),
        compute_q_blocks=False,  # forward only: the transposed lists serve the backward
    )


def _vmap_available() -> bool:
    """False inside a compiled graph's custom op, where functorch (vmap, which eager FlexAttention needs) is off."""
    return not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode)


def _run(q, k, v, block_mask, block_m, block_n, scale, return_lse, reference):
    """Run FlexAttention. ``reference()`` runs the same call on the PyTorch backend where Flex cannot: eager Flex
    inside a compiled graph (it needs vmap, which is off there) and the LSE from compiled Flex on CPU there."""
    compiled = compile_mode(q.device)
    if not _vmap_available() and (not compiled or (return_lse and q.device.type == "cpu")):
        return reference()
    if compiled and return_lse and q.device.type == "cpu":  # the CPU kernel has no LSE output
        compiled = False
    opts = kernel_options(block_m, block_n, q.device)
    aux = AuxRequest(lse=True) if return_lse else None
    if compiled:
        res = _flex_fn(q.device)(q, k, v, block_mask=block_mask, scale=scale, kernel_options=opts, return_aux=aux)
    else:
        with warnings.catch_warnings():  # eager was chosen ($DIFFATTN_FLEX_COMPILE): no "use torch.compile" nag
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            res = flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=opts, return_aux=aux)
    if return_lse:
        out, a = res
        return out, a.lse.float()
    return res


def block_sparse_attention_flex(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ``"flex"`` backend of ``block_sparse_attention`` (inputs validated by the dispatcher)."""
    bm = build_block_mask(kv_indices, kv_counts, q.shape[2], k.shape[2], block_m, block_n, key_padding_mask)
    kw = {"block_m": block_m, "block_n": block_n, "key_padding_mask": key_padding_mask, "scale": scale}

    def ref():
        return block_sparse_attention_torch(q, k, v, kv_indices, kv_counts, return_lse=return_lse, **kw)

    return _run(q, k, v, bm, block_m, block_n, scale, return_lse, ref)


def block_sparse_attention_table_flex(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ``"flex"`` backend of ``block_sparse_attention_table``: membership stays per pattern."""
    bm = build_block_mask(
        table_indices, table_counts, q.shape[2], k.shape[2], block_m, block_n, key_padding_mask, head_table=head_table
    )
    kw = {"block_m": block_m, "block_n": block_n, "key_padding_mask": key_padding_mask, "scale": scale}
    ht = head_table.long()

    def ref():
        return block_sparse_attention_torch(q, k, v, table_indices[ht], table_counts[ht], return_lse=return_lse, **kw)

    return _run(q, k, v, bm, block_m, block_n, scale, return_lse, ref)
