"""HunyuanVideo-1.5 (``HunyuanVideo15Transformer3DModel``): 54 dual-stream blocks, no single-stream blocks.

Sequence ``[video (t, h, w), conditioning]``. The conditioning tail is built by the transformer itself: per batch
element, the valid tokens of the image embedding (SigLIP, 729; masked out entirely for text-to-video), ByT5 glyph
text and the Qwen2.5-VL prompt first, then every padded token; the stock processor receives that tail's boolean mask
(B, L) and pads it with True for the video. All of it is run densely as text; its padding is a key mask. RoPE on the
video part only; RMS qk-norm. Image-to-video's first frame enters through the input channels (concatenated
latents), not as tokens, so it needs nothing here. Latents are (B, C, F, H, W).

The stock processor masks padded *query* rows too (a (B, 1, N, N) mask); the sparse path masks keys only. Padded
rows never reach a valid token (they are masked keys in every layer and dropped before the output projection), so
the output does not change; the dense fallback is the stock call itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .base import ModelAdapter
from .processor import AcceleratedAttnProcessor
from .token_order import TokenOrderSites


class HunyuanVideo15AttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for ``HunyuanVideo15AttnProcessor2_0`` that routes attention to a method."""

    model_name = "HunyuanVideo-1.5"
    text_first = False

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:
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

        batch_size, seq_len, _, _ = query.shape
        if attention_mask is None:
            raise ValueError("diffusers-attn: HunyuanVideo-1.5 attention needs the conditioning mask (stock does too)")
        # As stock: the conditioning mask, padded with True for the (local) video tokens in front of it.
        key_mask = F.pad(attention_mask, (seq_len - attention_mask.shape[1], 0), value=True).bool()

        def dense_bshd() -> torch.Tensor:
            m1 = key_mask.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
            pair_mask = (m1 & m1.transpose(2, 3)).bool()
            return dispatch_attention_fn(
                query, key, value,
                attn_mask=pair_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        hidden_states = self.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_len=text_len,
            attention_mask=key_mask, dense_fn=lambda: dense_bshd().transpose(1, 2),
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


class HunyuanVideo15Adapter(ModelAdapter):
    name = "hunyuan_video15"
    transformer_class_name = "HunyuanVideo15Transformer3DModel"
    block_prefixes = ("transformer_blocks.",)  # the token refiner (context_embedder.*) stays stock
    processor_cls = HunyuanVideo15AttnProcessor

    def transformer_class(self) -> type:
        from diffusers import HunyuanVideo15Transformer3DModel

        return HunyuanVideo15Transformer3DModel

    def native_processor_classes(self) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        return (HunyuanVideo15AttnProcessor2_0,)

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites:
        # x_embedder returns the video tokens (B, N, C); rope returns the (cos, sin) tables (N, D) of the video.
        return TokenOrderSites(permute={"x_embedder": 1, "rope": 0}, unpermute={"proj_out": 1})

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any]:
        from diffusers.models._modeling_parallel import ContextParallelInput as In
        from diffusers.models._modeling_parallel import ContextParallelOutput as Out

        # diffusers ships no plan for this model. Video tokens are split right after patch embedding, RoPE tables
        # after they are built; each rank's processor pads the replicated conditioning mask for its local video, and
        # the conditioning tokens are never split.
        return {
            "x_embedder": {0: In(split_dim=1, expected_dims=3, split_output=True)},
            "rope": {0: In(split_dim=0, expected_dims=2, split_output=True),
                     1: In(split_dim=0, expected_dims=2, split_output=True)},
            "proj_out": Out(gather_dim=1, expected_dims=3),
        }

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        _, _, frames, height, width = bound["hidden_states"].shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return (frames // p_t, height // p, width // p)
