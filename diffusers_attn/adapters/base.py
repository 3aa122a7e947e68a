"""What every model adapter provides: transformer recognition, the latent grid, which processors to replace, and
a processor class that computes q/k/v exactly as the stock one before handing attention to a method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..methods.base import AttentionMethod
from .processor import AcceleratedAttnProcessor
from .token_order import TokenOrderSites

if TYPE_CHECKING:
    from ..context import AttentionContext


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement :meth:`latent_grid`."""

    name: str = ""
    transformer_class_name: str = ""
    #: what layout the processors hand methods: "video" (TokenLayout) or "scales" (ScaleLayout)
    layout_kind: str = "video"
    #: processor-key prefixes of the attention layers to accelerate (others, e.g. a text refiner, stay stock)
    block_prefixes: tuple[str, ...] = ()
    processor_cls: type[AcceleratedAttnProcessor] = AcceleratedAttnProcessor

    def transformer_class(self) -> type:
        raise NotImplementedError

    def native_processor_classes(self) -> tuple[type, ...]:
        raise NotImplementedError

    def matches(self, transformer: torch.nn.Module) -> bool:
        try:
            return isinstance(transformer, self.transformer_class())
        except ImportError:
            return False

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        """Post-patch (T, H, W) from the transformer's bound forward arguments."""
        raise NotImplementedError

    def forward_inputs(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[Any, Any] | None:
        """``(grid, timestep)`` the context records before each transformer forward; None records nothing (a
        model whose generation is not a sequence of forwards, e.g. VAR, tells the context itself)."""
        return self.latent_grid(transformer, bound), bound.get("timestep")

    def attention_layer_keys(self, processors: dict[str, Any], *, allow_replacing: tuple[type, ...] = ()) -> list[str]:
        """Keys of ``transformer.attn_processors`` to replace, in layer order.

        Raises if a layer carries a processor that is neither the model's native one nor one of ours: replacing
        it would silently drop someone else's modification.
        """
        native = self.native_processor_classes() + allow_replacing
        keys = [k for k in processors if k.startswith(self.block_prefixes)]
        foreign = [(k, type(p).__name__) for k, p in processors.items() if k in keys and not isinstance(p, native)]
        if foreign:
            listed = ", ".join(f"{k} ({n})" for k, n in foreign[:4])
            raise ValueError(
                f"diffusers-attn: {self.transformer_class_name} attention layers carry non-stock processors "
                f"({listed}{', ...' if len(foreign) > 4 else ''}); expected "
                f"{[c.__name__ for c in self.native_processor_classes()]}. Restore the stock processors "
                "(e.g. transformer.set_default_attn_processor() or remove the other modification) first."
            )
        if not keys:
            raise ValueError(f"diffusers-attn: no attention layers found under {self.block_prefixes}")
        return keys

    def layers_per_forward(self, keys: list[str]) -> int:
        """Attention calls one transformer forward makes (the stats' count of calls a cache skipped); 0 when
        the model's generation does not go through forward (VAR)."""
        return len(keys)

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites | None:
        """Where the video tokens enter and leave the transformer, for methods that run them in their own order
        (see ``diffusers_attn.adapters.token_order``); None: the family does not support a token order."""
        return None

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any] | None:
        """diffusers context-parallel plan that shards only the video tokens (see ``diffusers_attn.parallel``)."""
        return None

    def make_processor(
        self, method: AttentionMethod, layer_index: int, context: "AttentionContext", original: Any = None,
        processor_cls: type | None = None,
    ) -> Any:
        """This family's processor (or ``processor_cls``, a subclass of it) for one attention layer."""
        proc = (processor_cls or self.processor_cls)(method, layer_index=layer_index, context=context)
        # Keep what the library injected into the stock processor (attention backend, parallel config), so the
        # dense path behaves exactly as before.
        for attr in ("_attention_backend", "_parallel_config"):
            if original is not None and getattr(original, attr, None) is not None:
                setattr(proc, attr, getattr(original, attr))
        return proc
