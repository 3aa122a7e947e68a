"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``).

Sequence ``[text, video]`` with text first and unmasked (padded prompt tokens are attended, as in the model);
RoPE (when used) on the video part only; qk LayerNorm over head_dim. Latents are (B, F, C, H, W); the grid is
``(F // patch_size_t or F, H // p, W // p)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..layout import TokenLayout
from .base import AcceleratedAttnProcessor, ModelAdapter


class CogVideoXAttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for ``CogVideoXAttnProcessor2_0`` (and its fused-QKV twin) that routes attention to a method."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self._require_context()
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        n_video = sequence_length - text_seq_length
        if attention_mask is not None:
            self._dense_fallback("attention_mask given (CogVideoX never passes one)", query, n_video)
            hidden_states = dense()
        else:
            layout = TokenLayout.text_first(ctx.require_grid(), text_seq_length)
            if layout.num_video != n_video:
                raise ValueError(
                    f"diffusers-attn: CogVideoX layer {self.layer_index} got {n_video} video tokens but the latent "
                    f"grid {layout.grid} has {layout.num_video}"
                )
            hidden_states = self.method(
                query, key, value,
                layout=layout, key_padding_mask=None, scale=None,
                layer_index=self.layer_index, context=ctx, dense_fn=dense,
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    transformer_class_name = "CogVideoXTransformer3DModel"
    block_prefixes = ("transformer_blocks.",)
    processor_cls = CogVideoXAttnProcessor

    def transformer_class(self) -> type:
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel

    def native_processor_classes(self) -> tuple[type, ...]:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

        return (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0)

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        hs = bound["hidden_states"]
        _, frames, _, height, width = hs.shape
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t
        return (frames // p_t if p_t else frames, height // p, width // p)
