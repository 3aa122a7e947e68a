"""Wan 2.1 / 2.2 (``WanTransformer3DModel``: T2V, I2V, FLF2V, TI2V-5B; ``WanVACETransformer3DModel``).

Self-attention (``attn1``) is video-only: text, and the CLIP image tokens of I2V/FLF2V, enter through
cross-attention (``attn2``), which keeps its stock processor. q/k/v go through RMS norm across heads, then the
(t, h, w) RoPE pair ``(cos, sin)``, exactly as in ``WanAttnProcessor``. Latents are (B, C, F, H, W); the grid is
``(F // p_t, H // p_h, W // p_w)`` with ``patch_size`` from the config. Wan 2.2 TI2V passes one timestep per video
token (B, N), which follows the token order like the tokens themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .base import ModelAdapter
from .processor import AcceleratedAttnProcessor
from .token_order import TokenOrderSites


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # The stock processor's rotation, operation for operation (it is a closure there, so it cannot be imported).
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanAttnProcessor(AcceleratedAttnProcessor):
    """Drop-in for diffusers' ``WanAttnProcessor`` on the self-attention layers (``attn1``) only."""

    model_name = "Wan"
    text_first = False  # no text in the sequence at all (text_len = 0)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.is_cross_attention:
            raise ValueError(
                f"diffusers-attn: {type(self).__name__} runs Wan self-attention (attn1) only; cross-attention "
                "layers keep the stock WanAttnProcessor"
            )
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # fused to_qkv too

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        def dense_bshd() -> torch.Tensor:
            return dispatch_attention_fn(
                query, key, value,
                attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        hidden_states = self.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_len=0,
            attention_mask=attention_mask, dense_fn=lambda: dense_bshd().transpose(1, 2),
        ).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class WanAdapter(ModelAdapter):
    name = "wan"
    transformer_class_name = "WanTransformer3DModel"
    block_prefixes = ("blocks.",)
    processor_cls = WanAttnProcessor

    def transformer_class(self) -> type:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def native_processor_classes(self) -> tuple[type, ...]:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor as StockWanAttnProcessor

        return (StockWanAttnProcessor,)

    def attention_layer_keys(self, processors: dict[str, Any], *, allow_replacing: tuple[type, ...] = ()) -> list[str]:
        # Only the self-attention layers: cross-attention (text, CLIP image tokens) stays stock.
        self_attn = {k: p for k, p in processors.items() if k.endswith(".attn1.processor")}
        return super().attention_layer_keys(self_attn, allow_replacing=allow_replacing)

    def forward_inputs(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[Any, Any]:
        t = bound.get("timestep")
        if isinstance(t, torch.Tensor) and t.ndim == 2:
            # Wan 2.2 TI2V: one timestep per token, 0 on a conditioning first frame; the step is the largest.
            t = t.amax(dim=1)
        return self.latent_grid(transformer, bound), t

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites:
        # patch_embedding returns (B, C, T, H, W) before flattening to tokens: permute over (T, H, W) flattened.
        # The RoPE pair is (1, N, 1, D) each; a per-token timestep (TI2V) is (B, N), a per-sample one is left alone.
        return TokenOrderSites(permute={"patch_embedding": (2, 3, 4), "rope": 1}, unpermute={"proj_out": 1},
                               forward_kwargs={"timestep": 1})

    def cp_plan(self, transformer: torch.nn.Module) -> dict[str, Any] | None:
        # diffusers' own Wan plan already shards only video tokens: RoPE and hidden states are split, the
        # cross-attention context (text + image tokens) is not; a per-token timestep (TI2V) is split with them.
        plan = getattr(type(transformer), "_cp_plan", None)
        return dict(plan) if plan else None

    def latent_grid(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int]:
        hs = bound["hidden_states"]
        _, _, frames, height, width = hs.shape
        p_t, p_h, p_w = transformer.config.patch_size
        return (frames // p_t, height // p_h, width // p_w)


class WanVACEAdapter(WanAdapter):
    """VACE: the same self-attention in the main and the control (``vace_blocks``) blocks; the control tokens are
    embedded by ``vace_patch_embedding`` on the same grid, so they take the same token order."""

    name = "wan_vace"
    transformer_class_name = "WanVACETransformer3DModel"
    block_prefixes = ("blocks.", "vace_blocks.")

    def transformer_class(self) -> type:
        from diffusers import WanVACETransformer3DModel

        return WanVACETransformer3DModel

    def token_order_sites(self, transformer: torch.nn.Module) -> TokenOrderSites:
        sites = super().token_order_sites(transformer)
        sites.permute["vace_patch_embedding"] = (2, 3, 4)
        return sites
