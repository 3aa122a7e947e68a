"""What every model adapter provides: transformer recognition, the latent grid, which processors to replace,
and processor classes that compute q/k/v exactly as the stock ones before handing attention to a method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..processors.base import AttentionMethod, record_dense_fallback

if TYPE_CHECKING:
    from ..context import AttentionContext


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement :meth:`latent_grid`."""

    name: str = ""
    transformer_class_name: str = ""
    #: processor-key prefixes of the attention layers to accelerate (others, e.g. a text refiner, stay stock)
    block_prefixes: tuple[str, ...] = ()
    processor_cls: type = object

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

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any] | None:
        """diffusers context-parallel plan that shards only the video tokens (see ``diffusers_attn.parallel``)."""
        return None

    def make_processor(
        self, method: AttentionMethod, layer_index: int, context: "AttentionContext", original: Any = None
    ) -> Any:
        proc = self.processor_cls(method, layer_index=layer_index, context=context)
        # Keep what the library injected into the stock processor (attention backend, parallel config), so the
        # dense path behaves exactly as before.
        for attr in ("_attention_backend", "_parallel_config"):
            if original is not None and getattr(original, attr, None) is not None:
                setattr(proc, attr, getattr(original, attr))
        return proc


class AcceleratedAttnProcessor:
    """Base of the per-model processors: holds the method, this layer's index and the shared context."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, method: AttentionMethod, *, layer_index: int, context: "AttentionContext | None" = None):
        if not callable(method):
            raise TypeError(f"method must be an attention method (callable), got {type(method).__name__}")
        if not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
        self.method = method
        self.layer_index = layer_index
        self.context = context
        from ..ops import register_processor

        self._op_handle = register_processor(self)  # for the compiled path (see diffusers_attn.ops)

    def _require_context(self) -> "AttentionContext":
        if self.context is None:
            raise RuntimeError(
                f"{type(self).__name__} has no AttentionContext: create one with "
                "diffusers_attn.attach_attention_context(transformer) and pass it as context=..."
            )
        return self.context

    def _exchange(self, ctx: "AttentionContext"):
        """The Ulysses exchange when context parallelism is active, else None."""
        pc = self._parallel_config if self._parallel_config is not None else getattr(ctx, "parallel_config", None)
        if pc is None or getattr(pc, "context_parallel_config", None) is None:
            return None
        ex = getattr(self, "_ulysses", None)
        if ex is None or self._ulysses_config is not pc:
            from ..parallel import UlyssesExchange

            ex = self._ulysses = UlyssesExchange(pc)
            self._ulysses_config = pc
        return ex

    def _call_method(self, q, k, v, *, ctx, layout, key_padding_mask, dense_fn, exchange=None, total_heads=None):
        """Run the method on (B, H_local, N, D) tensors of the whole sequence.

        While ``torch.compile`` traces, the call goes through the opaque custom op
        ``diffusers_attn::accelerated_attention`` (no graph break, no per-step recompilation)."""
        if torch.compiler.is_compiling():
            from ..ops import accelerated_attention_op

            return accelerated_attention_op(
                q, k, v, key_padding_mask, self._op_handle, layout.frames, layout.height, layout.width, layout.video_offset,
                layout.text_offset, layout.text_len,
                exchange.rank * q.shape[1] if exchange is not None else 0,
                total_heads if exchange is not None else 0,
                ctx.compile_token,
            )
        kwargs = {}
        if exchange is not None:
            import inspect

            params = inspect.signature(self.method.__call__).parameters
            if "head_offset" not in params:
                raise ValueError(
                    f"diffusers-attn: method {getattr(self.method, 'name', self.method)!r} does not support context "
                    "parallelism (it takes no head_offset)"
                )
            kwargs = dict(head_offset=exchange.rank * q.shape[1], total_heads=total_heads)
        return self.method(
            q, k, v, layout=layout, key_padding_mask=key_padding_mask, scale=None,
            layer_index=self.layer_index, context=ctx, dense_fn=dense_fn, **kwargs,
        )

    def _check_video_tokens(self, model: str, layout, n_video_local: int, ranks: int = 1) -> None:
        """The latent grid from the context hook must account for exactly the video tokens this layer holds."""
        if layout.num_video != n_video_local * ranks:
            per_rank = f" per rank over {ranks} ranks" if ranks > 1 else ""
            raise ValueError(
                f"diffusers-attn: {model} layer {self.layer_index} holds {n_video_local} video tokens{per_rank}, but "
                f"the latent grid {layout.grid} has {layout.num_video}"
            )

    def _dense_fallback(self, reason: str, q_bhsd: torch.Tensor, n_video: int, key_padding_mask=None) -> None:
        ctx = self._require_context()
        B, H, N, D = q_bhsd.shape
        n_valid = float(key_padding_mask.sum()) if key_padding_mask is not None else float(N) * B
        record_dense_fallback(
            ctx, self.layer_index, reason, batch=B, heads=H, head_dim=D, n_q=N, n_k_valid=n_valid, n_video=n_video
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={getattr(self.method, 'name', '?')}, layer_index={self.layer_index})"
