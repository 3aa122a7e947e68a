"""Running a transformer with its video tokens in a method's order (e.g. spatio-temporal tiles), once per forward.

The permutation is applied where the video tokens are created (patch embedding output, RoPE tables) and inverted
where they leave (the output projection), never per layer: every layer between only mixes tokens through
attention, which is equivariant to a consistent permutation of q, k, v and RoPE. Each adapter names these sites
(:class:`TokenOrderSites`); the video tokens are the last ``T*H*W`` entries along the named dimension (or along
consecutive dimensions flattened, e.g. ``(2, 3, 4)`` for a Conv3d output (B, C, T, H, W)).

Under diffusers' context parallelism the permutation must happen on the whole sequence: permuting hooks are
registered before the context-parallel split hooks (inner), inverting hooks after its gather hooks (outer);
:func:`diffusers_attn.parallel.enable_context_parallel` re-registers the inverting hooks for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..layout import tile_permutation
from .compile_op import lookup_handle

PERMUTE_HOOK = "diffusers_attn_token_order"
UNPERMUTE_HOOK = "diffusers_attn_token_order_inverse"


@dataclass
class TokenOrderSites:
    """Where a model family's video tokens enter and leave: module name -> sequence dim of its output (an int, or
    a tuple of consecutive dims that flatten to the sequence). A tensor without that dim is left alone (Wan's
    timestep: per token in TI2V, per sample otherwise)."""

    permute: dict[str, int | tuple[int, ...]]
    unpermute: dict[str, int | tuple[int, ...]]
    # transformer inputs built outside (RoPE tables, per-token timesteps)
    forward_kwargs: dict[str, int | tuple[int, ...]] = field(default_factory=dict)


class TokenPermuter:
    """The permutation of one (grid, tile) on one device."""

    def __init__(self, grid: tuple[int, int, int], tile: tuple[int, int, int], device: torch.device) -> None:
        self.grid, self.tile = grid, tile
        perm = tile_permutation(grid, tile)
        self.n = perm.numel()
        self.perm = perm.to(device)
        self.inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(self.n)).to(device)

    def _apply(self, x: Any, dim: int, index: torch.Tensor) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(self._apply(v, dim, index) for v in x)
        if not isinstance(x, torch.Tensor):
            return x
        d = dim % x.dim()
        n_all = x.shape[d]
        if n_all < self.n:
            raise ValueError(f"diffusers-attn: {n_all} tokens along dim {dim}, fewer than the {self.n} video tokens")
        head = x.narrow(d, 0, n_all - self.n)
        idx = index.to(x.device)
        tail = x.narrow(d, n_all - self.n, self.n).index_select(d, idx)
        return torch.cat([head, tail], dim=d) if n_all > self.n else tail

    def permute(self, x: Any, dim: int) -> Any:
        """Raster -> method order on the last ``T*H*W`` entries along ``dim`` (tensors or tuples of them)."""
        return self._apply(x, dim, self.perm)

    def unpermute(self, x: Any, dim: int) -> Any:
        return self._apply(x, dim, self.inv)


def permute_tokens(context: Any, x: Any, dim: int | tuple[int, ...], inverse: bool) -> Any:
    """Put ``x`` (a tensor or a tuple of them) into ``context``'s token order for this forward (or back).

    Eager: an ``index_select`` with the context's cached permutation. While ``torch.compile`` traces: the opaque op
    ``diffusers_attn::permute_tokens``, which looks the permutation up at run time (index tensors never enter the
    graph, so there is no recompilation per shape of the cache)."""
    tile = context.order_tile
    if tile is None:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(permute_tokens(context, v, dim, inverse) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    if isinstance(dim, tuple):  # consecutive dims that flatten into the token dim, e.g. (B, C, T, H, W) -> (2, 3, 4)
        d0, d1 = dim[0] % x.dim(), dim[-1] % x.dim()
        out = permute_tokens(context, x.flatten(d0, d1), d0, inverse)
        return out.unflatten(d0, x.shape[d0 : d1 + 1])
    if 0 <= dim and x.dim() <= dim:  # no token dim here (e.g. a per-sample timestep where per-token ones exist)
        return x
    if torch.compiler.is_compiling():
        return permute_tokens_op(x, context.op_handle, dim, inverse, *context.order_grid, *tile)
    p = context.permuter
    return p.unpermute(x, dim) if inverse else p.permute(x, dim)


@torch.library.custom_op("diffusers_attn::permute_tokens", mutates_args=())
def permute_tokens_op(x: torch.Tensor, handle: int, dim: int, inverse: bool, frames: int, height: int, width: int,
                      tt: int, th: int, tw: int) -> torch.Tensor:
    ctx = lookup_handle(handle, "attention context")
    p = ctx.permuter_for((frames, height, width), (tt, th, tw), x.device)
    out = p.unpermute(x, dim) if inverse else p.permute(x, dim)
    return out.contiguous()


@permute_tokens_op.register_fake
def _(x, handle, dim, inverse, frames, height, width, tt, th, tw):
    return x.new_empty(x.shape)


class _OrderHook(ModelHook):
    _is_stateful = False

    def __init__(self, context: Any, dim: int | tuple[int, ...], inverse: bool) -> None:
        super().__init__()
        self.context, self.dim, self.inverse = context, dim, inverse

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return permute_tokens(self.context, output, self.dim, self.inverse)


def register_order_hooks(transformer: torch.nn.Module, sites: TokenOrderSites, context: Any,
                         which: str = "both") -> None:
    """Register the permuting (``which="permute"``), inverting (``"unpermute"``) or both kinds of hooks."""
    groups = []
    if which in ("both", "permute"):
        groups.append((sites.permute, PERMUTE_HOOK, False))
    if which in ("both", "unpermute"):
        groups.append((sites.unpermute, UNPERMUTE_HOOK, True))
    for table, name, inverse in groups:
        for module_name, dim in table.items():
            registry = HookRegistry.check_if_exists_or_initialize(transformer.get_submodule(module_name))
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
            registry.register_hook(_OrderHook(context, dim, inverse), name)


def remove_order_hooks(transformer: torch.nn.Module, sites: TokenOrderSites, which: str = "both") -> None:
    for table, name in ((sites.permute, PERMUTE_HOOK), (sites.unpermute, UNPERMUTE_HOOK)):
        if which != "both" and name != (PERMUTE_HOOK if which == "permute" else UNPERMUTE_HOOK):
            continue
        for module_name in table:
            registry = getattr(transformer.get_submodule(module_name), "_diffusers_hook", None)
            if registry is not None and registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
