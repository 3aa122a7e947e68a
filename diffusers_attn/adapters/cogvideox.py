"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``).

Sequence ``[text, video]`` with text first and unmasked (padded prompt tokens are attended, as in the model);
RoPE (when used) on the video part only; qk LayerNorm over head_dim. Latents are (B, F, C, H, W); the grid is
``(F // patch_size_t or F, H // p, W // p)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from .base import ModelAdapter
from .processor import AcceleratedAttnProcessor
from .token_order import TokenOrderSites


class CogVideoXAttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for ``CogVideoXAttnProcessor2_0`` (and its fused-QKV twin) that routes attention to a method."""

    model_name = "CogVideoX"
    text_first = True

    def key_padding(self, attention_mask, batch, n):
        if attention_mask is None:
            return None, None
        return None, "attention_mask given (CogVideoX never passes one)"

    def dense_global(self, q, k, v, key_padding_mask):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                                              is_causal=False)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = self.attend(query, key, value, text_len=text_seq_length, attention_mask=attention_mask,
                                    dense_fn=dense)
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

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites:
        # patch_embed returns [text, video]; the pipeline builds the RoPE tables and passes them in
        return TokenOrderSites(permute={"patch_embed": 1}, unpermute={"proj_out": 1},
                               forward_kwargs={"image_rotary_emb": 0})

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any]:
        from diffusers.models._modeling_parallel import ContextParallelInput as In
        from diffusers.models._modeling_parallel import ContextParallelOutput as Out

        # Text and video are concatenated in patch_embed, so split the video where it enters the first block;
        # every block receives the full RoPE tables, so split them at each block.
        return {
            "transformer_blocks.0": {"hidden_states": In(split_dim=1, expected_dims=3)},
            "transformer_blocks.*": {"image_rotary_emb": (In(split_dim=0, expected_dims=2),
                                                          In(split_dim=0, expected_dims=2))},
            "proj_out": Out(gather_dim=1, expected_dims=3),
        }

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        hs = bound["hidden_states"]
        _, frames, _, height, width = hs.shape
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t
        return (frames // p_t if p_t else frames, height // p, width // p)
