"""The processor base: the control flow every adapter's processor shares.

An adapter's processor computes q, k, v exactly as the stock processor, calls :meth:`AcceleratedAttnProcessor.attend`
and finishes exactly as the stock processor. ``attend`` owns everything in between: the key-padding mask or the
dense fallback (logged in the stats with its reason), the Ulysses exchange under context parallelism, the compile
custom op, the method call, and writing the method's record into the stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from ..layout import TokenLayout
from ..methods.base import AttentionMethod, dense_record
from .compile_op import accelerated_attention_op, register_handle
from .ulysses import UlyssesExchange, global_to_joint, joint_to_global

if TYPE_CHECKING:
    from ..context import AttentionContext


def run_method(
    method: AttentionMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    context: "AttentionContext",
    layout: Any,
    key_padding_mask: torch.Tensor | None,
    layer_index: int,
    dense_fn: Callable[[], torch.Tensor],
    scale: float | None = None,
    head_offset: int = 0,
    total_heads: int | None = None,
) -> torch.Tensor:
    """One method call on (B, H, N, D) tensors: the call info from the context in, the record into the stats."""
    call = context.call_info(layer_index, head_offset=head_offset, total_heads=total_heads)
    out, record = method.attend(q, k, v, layout=layout, key_padding_mask=key_padding_mask, scale=scale, call=call,
                                dense_fn=dense_fn)
    if record is not None:  # None: nothing to count (e.g. a teacher-forced or distillation call)
        context.record(layer_index, record, head_offset=head_offset, total_heads=total_heads)
    return out


class AcceleratedAttnProcessor:
    """Base of the per-model processors: holds the method, this layer's index and the shared context."""

    #: the model family's name in error messages
    model_name = "model"
    #: sequence order of the joint attention: ``[text, video]`` (True) or ``[video, text]``
    text_first = True
    _attention_backend = None
    _parallel_config = None

    def __init__(self, method: AttentionMethod, *, layer_index: int, context: "AttentionContext | None" = None):
        if not callable(getattr(method, "attend", None)):
            raise TypeError(f"method must be an attention method (with .attend), got {type(method).__name__}")
        if not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
        self.method = method
        self.layer_index = layer_index
        self.context = context
        self._op_handle = register_handle(self)  # for the compiled path (see compile_op)
        self._ulysses: UlyssesExchange | None = None
        self._ulysses_config: Any = None

    def _require_context(self) -> "AttentionContext":
        if self.context is None:
            raise RuntimeError(
                f"{type(self).__name__} has no AttentionContext: create one with "
                "diffusers_attn.attach_attention_context(transformer) and pass it as context=..."
            )
        return self.context

    def _exchange(self, ctx: "AttentionContext") -> UlyssesExchange | None:
        """The Ulysses exchange when context parallelism is active, else None."""
        pc = self._parallel_config if self._parallel_config is not None else getattr(ctx, "parallel_config", None)
        if pc is None or getattr(pc, "context_parallel_config", None) is None:
            return None
        if self._ulysses is None or self._ulysses_config is not pc:
            self._ulysses, self._ulysses_config = UlyssesExchange(pc), pc
        return self._ulysses

    # ------------------------------------------------------------------ what adapters may override
    def key_padding(self, attention_mask: torch.Tensor | None, batch: int, n: int) -> tuple[torch.Tensor | None,
                                                                                        str | None]:
        """``(key_padding_mask (B, N) bool, None)`` from the stock ``attention_mask``, or ``(None, reason)`` when the
        call must run the stock dense path."""
        if attention_mask is None:
            return None, None
        if attention_mask.dtype == torch.bool and attention_mask.numel() == batch * n:
            return attention_mask.reshape(batch, n), None
        return None, f"unsupported attention_mask {attention_mask.dtype} {tuple(attention_mask.shape)}"

    def dense_global(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Stock dense attention on (B, N, H/P, D) global tensors under context parallelism; returns (B, H/P, N, D)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend).transpose(1, 2)

    # ------------------------------------------------------------------ the shared control flow
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        text_len: int,
        attention_mask: torch.Tensor | None,
        dense_fn: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Attention over this rank's joint sequence: (B, H, N, D) in (views fine), (B, H, N, D) out.

        ``dense_fn()`` is the stock attention call on these tensors, returning (B, H, N, D)."""
        ctx = self._require_context()
        B, H, N, D = query.shape
        ex = self._exchange(ctx)
        kpm, reason = self.key_padding(attention_mask, B, N)
        n_video = N - text_len
        if reason is not None:
            if ex is not None:
                raise ValueError(f"diffusers-attn: {reason}: not supported under context parallelism")
            n_valid = float(kpm.sum()) if kpm is not None else float(N) * B
            ctx.record(self.layer_index, dense_record(reason, batch=B, heads=H, head_dim=D, n_q=N, n_k_valid=n_valid,
                                                      n_video=n_video))
            return dense_fn()
        make = TokenLayout.text_first if self.text_first else TokenLayout.video_first
        layout = make(ctx.require_grid(), text_len, order=ctx.token_order)
        self._check_video_tokens(layout, n_video, ex.size if ex is not None else 1)
        if ex is None:
            return self._call_method(query, key, value, ctx=ctx, layout=layout, key_padding_mask=kpm,
                                     dense_fn=dense_fn)
        if kpm is not None:  # only text is ever padded: rebuild the global mask from the replicated text part
            ones = kpm.new_ones(B, layout.num_video)
            kpm = torch.cat([kpm[:, :text_len], ones] if self.text_first else [ones, kpm[:, N - text_len:]], dim=1)
        qg, kg, vg = (joint_to_global(ex, x.transpose(1, 2), text_len, self.text_first) for x in (query, key, value))
        out = self._call_method(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), ctx=ctx, layout=layout, key_padding_mask=kpm,
            exchange=ex, total_heads=H, dense_fn=lambda: self.dense_global(qg, kg, vg, kpm),
        )
        return global_to_joint(ex, out.transpose(1, 2), text_len, self.text_first).transpose(1, 2)

    def run_method(self, q, k, v, *, layout, key_padding_mask, dense_fn, scale=None, head_offset=0,
                   total_heads=None):
        """The eager method call (also what the compile custom op runs)."""
        return run_method(self.method, q, k, v, context=self._require_context(), layout=layout,
                          key_padding_mask=key_padding_mask, layer_index=self.layer_index, dense_fn=dense_fn,
                          scale=scale, head_offset=head_offset, total_heads=total_heads)

    def _call_method(self, q, k, v, *, ctx, layout, key_padding_mask, dense_fn, exchange=None, total_heads=None):
        """Run the method on (B, H_local, N, D) tensors of the whole sequence.

        While ``torch.compile`` traces, the call goes through the opaque custom op
        ``diffusers_attn::accelerated_attention`` (no graph break, no per-step recompilation)."""
        head_offset = exchange.rank * q.shape[1] if exchange is not None else 0
        if exchange is not None and not getattr(self.method, "supports_context_parallel", False):
            raise ValueError(
                f"diffusers-attn: method {getattr(self.method, 'name', self.method)!r} does not support context "
                "parallelism"
            )
        if torch.compiler.is_compiling():
            return accelerated_attention_op(
                q, k, v, key_padding_mask, self._op_handle, layout.frames, layout.height, layout.width,
                layout.video_offset, layout.text_offset, layout.text_len, head_offset,
                total_heads if exchange is not None else 0, ctx.compile_token, *(layout.order or (0, 0, 0)),
            )
        return self.run_method(q, k, v, layout=layout, key_padding_mask=key_padding_mask, dense_fn=dense_fn,
                               head_offset=head_offset, total_heads=total_heads if exchange is not None else None)

    def _check_video_tokens(self, layout: TokenLayout, n_video_local: int, ranks: int = 1) -> None:
        """The latent grid from the context hook must account for exactly the video tokens this layer holds."""
        if layout.num_video != n_video_local * ranks:
            per_rank = f" per rank over {ranks} ranks" if ranks > 1 else ""
            raise ValueError(
                f"diffusers-attn: {self.model_name} layer {self.layer_index} holds {n_video_local} video tokens"
                f"{per_rank}, but the latent grid {layout.grid} has {layout.num_video}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={getattr(self.method, 'name', '?')}, layer_index={self.layer_index})"
