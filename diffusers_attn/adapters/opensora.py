"""Open-Sora 2.0 (``OpenSoraTransformer3DModel``, this package): Flux double- and single-stream attention.

Sequence ``[text, video (t, h, w)]``: text first, 512 unmasked T5 tokens, attended densely. Double-stream calls
get image ``hidden_states`` and text ``encoder_hidden_states`` separately; single-stream calls get the
concatenated sequence, and the text length is the sequence length minus the video tokens of the grid recorded
by the context hook. RMS qk-norm, then interleaved RoPE on every token (identity on text, whose ids are zero),
then attention. Latents are (B, C, T, H, W); the grid is (T, H / p, W / p), any size (the block lists cover
partial blocks, so grids that are not multiples of the block size work). Ulysses context parallelism shards
the video tokens only (:meth:`OpenSoraAdapter.cp_plan`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..pipelines.opensora.transformer import OpenSoraTransformer3DModel
from .base import ModelAdapter
from .processor import AcceleratedAttnProcessor
from .token_order import TokenOrderSites


class OpenSoraAttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for diffusers ``FluxAttnProcessor`` on Open-Sora that routes attention to a method."""

    model_name = "Open-Sora"
    text_first = True

    def key_padding(self, attention_mask, batch, n):
        if attention_mask is None:
            return None, None
        return None, "attention_mask given (Open-Sora never passes one)"

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = qkv.chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        dual = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if dual:
            if getattr(attn, "fused_projections", False):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def dense_bshd() -> torch.Tensor:
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                         backend=self._attention_backend, parallel_config=self._parallel_config)

        grid = self._require_context().require_grid()
        N = query.shape[1]
        ex = self._exchange(self.context)
        n_video = grid[0] * grid[1] * grid[2] // (ex.size if ex is not None else 1)  # video tokens this rank holds
        text_len = encoder_hidden_states.shape[1] if dual else N - n_video
        if text_len < 0:
            raise ValueError(
                f"diffusers-attn: Open-Sora layer {self.layer_index} holds {N} tokens, fewer than the {n_video} video "
                f"tokens of the latent grid {grid}"
            )
        out = self.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_len=text_len,
            attention_mask=attention_mask, dense_fn=lambda: dense_bshd().transpose(1, 2),
        ).transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            enc, img = out.split_with_sizes([encoder_hidden_states.shape[1], N - encoder_hidden_states.shape[1]], dim=1)
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            enc = attn.to_add_out(enc.contiguous())
            return img, enc
        return out


class OpenSoraAdapter(ModelAdapter):
    name = "opensora"
    transformer_class_name = "OpenSoraTransformer3DModel"
    block_prefixes = ("transformer_blocks.", "single_transformer_blocks.")
    processor_cls = OpenSoraAttnProcessor

    def transformer_class(self) -> type:
        return OpenSoraTransformer3DModel

    def native_processor_classes(self) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return (FluxAttnProcessor,)

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites:
        permute = {"x_embedder": 1, "pos_embed": 0}
        if transformer.cond_embedder is not None:
            permute["cond_embedder"] = 1  # summed with the image tokens, so permuted the same way
        return TokenOrderSites(permute=permute, unpermute={"proj_out": 1})

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any]:
        from diffusers.models._modeling_parallel import ContextParallelInput as In
        from diffusers.models._modeling_parallel import ContextParallelOutput as Out

        # Video tokens are split where they are embedded (image and condition projections, summed afterwards) and
        # the video RoPE tables where they are built; text (and its identity RoPE) is never split.
        plan = {
            "x_embedder": {0: In(split_dim=1, expected_dims=3, split_output=True)},
            "pos_embed": {0: In(split_dim=0, expected_dims=2, split_output=True),
                          1: In(split_dim=0, expected_dims=2, split_output=True)},
            "proj_out": Out(gather_dim=1, expected_dims=3),
        }
        if transformer.cond_embedder is not None:
            plan["cond_embedder"] = {0: In(split_dim=1, expected_dims=3, split_output=True)}
        return plan

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        return transformer.packed_grid(bound["hidden_states"])
