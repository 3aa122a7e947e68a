"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream and single-stream blocks.

Sequence ``[video (t, h, w), text]`` with the prompt padded at the tail and masked by a boolean key mask
``[B, 1, 1, N]``; RoPE on the video part only; RMS qk-norm. The text token refiner
(``context_embedder.token_refiner``) keeps its stock processor. Latents are (B, C, F, H, W).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .base import ModelAdapter
from .processor import AcceleratedAttnProcessor
from .token_order import TokenOrderSites


class HunyuanVideoAttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for ``HunyuanVideoAttnProcessor2_0`` that routes attention to a method."""

    model_name = "HunyuanVideo"
    text_first = False

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if single_stream:
                n_txt = encoder_hidden_states.shape[1]
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-n_txt], image_rotary_emb, sequence_dim=1), query[:, -n_txt:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-n_txt], image_rotary_emb, sequence_dim=1), key[:, -n_txt:]], dim=1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        def dense_bshd() -> torch.Tensor:
            return dispatch_attention_fn(
                query, key, value,
                attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        hidden_states = self.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_len=text_len,
            attention_mask=attention_mask, dense_fn=lambda: dense_bshd().transpose(1, 2),
        ).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuan_video"
    transformer_class_name = "HunyuanVideoTransformer3DModel"
    block_prefixes = ("transformer_blocks.", "single_transformer_blocks.")
    processor_cls = HunyuanVideoAttnProcessor

    def transformer_class(self) -> type:
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel

    def native_processor_classes(self) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return (HunyuanVideoAttnProcessor2_0,)

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites:
        # The first frame keeps its positions (token-replace I2V addresses it by position).
        return TokenOrderSites(permute={"x_embedder": 1, "rope": 0}, unpermute={"proj_out": 1})

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any]:
        from diffusers.models._modeling_parallel import ContextParallelInput as In
        from diffusers.models._modeling_parallel import ContextParallelOutput as Out

        if getattr(transformer.config, "image_condition_type", None) == "token_replace":
            raise ValueError("diffusers-attn: context parallelism does not support HunyuanVideo token-replace I2V")
        # Video tokens are split right after patch embedding, RoPE tables after they are built; the attention
        # mask is then built per rank for (local video + text), and text is never split.
        return {
            "x_embedder": {0: In(split_dim=1, expected_dims=3, split_output=True)},
            "rope": {0: In(split_dim=0, expected_dims=2, split_output=True),
                     1: In(split_dim=0, expected_dims=2, split_output=True)},
            "proj_out": Out(gather_dim=1, expected_dims=3),
        }

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        hs = bound["hidden_states"]
        _, _, frames, height, width = hs.shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return (frames // p_t, height // p, width // p)
