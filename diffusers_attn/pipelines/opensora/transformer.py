"""``OpenSoraTransformer3DModel``: Open-Sora 2.0's MMDiT on diffusers' Flux blocks.

Open-Sora 2.0 is FLUX.1 with 3-axis (t, h, w) RoPE, no guidance embedding and an extra conditioning projection
(``cond_embedder``, the original ``cond_in``) for image/video conditioning. After the weight transform in
:mod:`.convert` (per-head q/k permutation rotate-half -> interleaved) it runs on the stock Flux modules, so
Flux-targeted processors, caches and regional compilation apply. Attribute names follow Flux.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn


def pack_latents(x: torch.Tensor, p: int) -> torch.Tensor:
    """``b c t (h p) (w p) -> b (t h w) (c p p)`` (Flux channel order)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // p) * (w // p), c * p * p)


def unpack_latents(x: torch.Tensor, grid: tuple[int, int, int], p: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a packed ``grid`` (T, H/p, W/p)."""
    b, _, cpp = x.shape
    t, h, w = grid
    c = cpp // (p * p)
    x = x.reshape(b, t, h, w, c, p, p)
    return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h * p, w * p)


def video_ids(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """(T*H*W, 3) integer-valued (t, h, w) positions of the packed grid, raster order (t outermost)."""
    t, h, w = grid
    ids = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    return ids.reshape(-1, 3).to(device=device, dtype=torch.float32)


class OpenSoraTransformer3DModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, CacheMixin):
    """Open-Sora 2.0 MMDiT (19 double-stream + 38 single-stream Flux blocks, 24 heads x 128 by default).

    Input latents are 5-D ``[B, in_channels, T, H, W]`` (H, W multiples of ``patch_size``); the output is the
    velocity in the same shape. ``condition`` is ``[B, in_channels + 1, T, H, W]`` (mask first, then the reference
    latent); ``None`` means zeros, and ``cond_embedder`` (with its bias) still runs, as in the original model.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int | None = 16,
        patch_size: int = 2,
        num_layers: int = 19,
        num_single_layers: int = 38,
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        rope_theta: int = 10000,
        mlp_ratio: float = 4.0,
        cond_embed: bool = True,
        guidance_embeds: bool = False,
    ):
        super().__init__()
        if guidance_embeds:
            raise ValueError("OpenSoraTransformer3DModel: guidance_embeds=True is not supported (Open-Sora 2.0 has none)")
        if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {tuple(axes_dims_rope)} must be even and sum to attention_head_dim={attention_head_dim}"
            )
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        p2 = patch_size * patch_size

        self.pos_embed = FluxPosEmbed(theta=rope_theta, axes_dim=list(axes_dims_rope))
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=self.inner_dim, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, self.inner_dim)
        self.x_embedder = nn.Linear(in_channels * p2, self.inner_dim)
        self.cond_embedder = nn.Linear((in_channels + 1) * p2, self.inner_dim) if cond_embed else None

        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                FluxSingleTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim, mlp_ratio=mlp_ratio)
                for _ in range(num_single_layers)
            ]
        )
        if mlp_ratio != 4.0:  # FluxTransformerBlock's FeedForward is fixed at 4x; keep both streams consistent
            raise ValueError("OpenSoraTransformer3DModel: only mlp_ratio=4.0 is supported")
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, p2 * self.out_channels)
        self.gradient_checkpointing = False

    def packed_grid(self, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """(T, H/p, W/p) of 5-D latents, with a clear error for unsupported shapes."""
        p = self.config.patch_size
        if hidden_states.ndim != 5:
            raise ValueError(
                f"OpenSoraTransformer3DModel expects 5-D latents [B, C, T, H, W], got shape {tuple(hidden_states.shape)}"
            )
        _, c, t, h, w = hidden_states.shape
        if c != self.config.in_channels:
            raise ValueError(f"latents have {c} channels, the model expects in_channels={self.config.in_channels}")
        if h % p or w % p:
            raise ValueError(f"latent height/width ({h}, {w}) must be multiples of patch_size={p}")
        return (t, h // p, w // p)

    def _check_context_parallel(self, grid: tuple[int, int, int]) -> None:
        """Under context parallelism the video tokens are split evenly: say so before diffusers asserts."""
        cp = getattr(getattr(self, "_parallel_config", None), "context_parallel_config", None)
        if cp is None:
            return
        degree = int(cp.ulysses_degree or 1) * int(cp.ring_degree or 1)
        n = grid[0] * grid[1] * grid[2]
        if n % degree:
            raise ValueError(
                f"context parallelism over {degree} ranks needs the video token count to divide evenly: grid {grid} "
                f"has {n} tokens; choose frames/height/width so that T * (H/16) * (W/16) is a multiple of {degree}"
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Velocity for latents ``hidden_states`` at flow time ``timestep`` (sigma in [0, 1], one per sample)."""
        p = self.config.patch_size
        grid = self.packed_grid(hidden_states)
        self._check_context_parallel(grid)
        B = hidden_states.shape[0]
        x = self.x_embedder(pack_latents(hidden_states, p))
        if self.cond_embedder is not None:
            if condition is None:
                # full token count, not x.shape[1]: under context parallelism x is already this rank's shard
                cond_packed = x.new_zeros(B, grid[0] * grid[1] * grid[2], self.cond_embedder.in_features)
            else:
                expected = (B, self.config.in_channels + 1, *hidden_states.shape[2:])
                if tuple(condition.shape) != expected:
                    raise ValueError(f"condition must have shape {expected} (mask + latent), got {tuple(condition.shape)}")
                cond_packed = pack_latents(condition.to(x.dtype), p)
            x = x + self.cond_embedder(cond_packed)
        elif condition is not None:
            raise ValueError("this model was built with cond_embed=False and takes no condition")

        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(B).to(x.dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections.to(x.dtype))
        encoder_hidden_states = self.context_embedder(encoder_hidden_states.to(x.dtype))

        # Text ids are all zero, so RoPE is the identity there (cos 1, sin 0, exactly what FluxPosEmbed gives for
        # id 0). Building the text part directly keeps pos_embed video-only, so a context-parallel plan can shard
        # its output together with the video tokens.
        vid_cos, vid_sin = self.pos_embed(video_ids(grid, x.device))
        n_txt = encoder_hidden_states.shape[1]
        image_rotary_emb = (
            torch.cat([vid_cos.new_ones(n_txt, vid_cos.shape[1]), vid_cos], dim=0),
            torch.cat([vid_sin.new_zeros(n_txt, vid_sin.shape[1]), vid_sin], dim=0),
        )

        # Flux double- and single-stream blocks share one call signature and both return (text, video).
        for block in (*self.transformer_blocks, *self.single_transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, x = self._gradient_checkpointing_func(
                    block, x, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs
                )
            else:
                encoder_hidden_states, x = block(
                    hidden_states=x, encoder_hidden_states=encoder_hidden_states, temb=temb,
                    image_rotary_emb=image_rotary_emb, joint_attention_kwargs=attention_kwargs,
                )

        x = self.proj_out(self.norm_out(x, temb))
        out = unpack_latents(x, grid, p)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
