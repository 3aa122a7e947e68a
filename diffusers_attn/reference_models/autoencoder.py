"""A fixed (weight-free) pixel-space autoencoder that satisfies the CogVideoX / HunyuanVideo pipelines' VAE interface.

Encoding is an invertible space-to-depth rearrangement (``pixel_unshuffle`` by ``2 ** (len(block_out_channels) - 1)``)
plus a fixed affine normalisation; decoding inverts it exactly. There is no temporal compression
(``temporal_compression_ratio = 1``: latent frame i is video frame i). So the diffusion transformer models pixels
directly, and RainFusion's patterns act on a latent grid whose geometry is the video's own.

Why not a trained VAE: on a shared 2-core CPU the transformer's training budget is better spent on the transformer;
a lossless rearrangement removes the VAE as a source of error in dense-vs-sparse comparisons. The pipelines only
read ``config.block_out_channels`` (its length gives the spatial factor), ``config.temporal_compression_ratio``,
``config.scaling_factor`` (HunyuanVideo: the ``spatial_compression_ratio`` / ``temporal_compression_ratio``
attributes) and call ``decode(z)`` on ``z / scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    """``z = scaling_factor * (space_to_depth(x) - shift_factor)``; ``decode`` expects ``z / scaling_factor``.

    Shapes: video ``(B, 3, F, H, W)`` in [-1, 1] <-> latents ``(B, 3 r^2, F, H / r, W / r)`` with ``r`` the spatial
    factor.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (1, 1),
        temporal_compression_ratio: int = 1,
        scaling_factor: float = 3.0,
        shift_factor: float = -0.25,
    ) -> None:
        super().__init__()
        if temporal_compression_ratio != 1:
            raise ValueError("PixelShuffleAutoencoder has no temporal compression: temporal_compression_ratio=1")
        self.factor = 2 ** (len(block_out_channels) - 1)
        self.latent_channels = in_channels * self.factor**2
        # A buffer (not a weight) so that .dtype / .to() behave like any other pipeline module.
        self.register_buffer("shift", torch.tensor(float(shift_factor)), persistent=False)

    @property
    def spatial_compression_ratio(self) -> int:  # read by HunyuanVideoPipeline
        return self.factor

    @property
    def temporal_compression_ratio(self) -> int:  # read by HunyuanVideoPipeline
        return self.config.temporal_compression_ratio

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"PixelShuffleAutoencoder.{what} expects (B, {channels}, F, H, W), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] -> scaled latents (B, C, F, h, w)."""
        self._check(x, self.config.in_channels, "encode")
        b, c, f, h, w = x.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"height and width must be multiples of {self.factor}, got {h}x{w}")
        y = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * f, c, h, w), self.factor)
        y = y.reshape(b, f, *y.shape[1:]).transpose(1, 2)
        return (y - self.shift) * self.config.scaling_factor

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Unscaled latents (``z / scaling_factor``, as the pipelines pass them) -> video in about [-1, 1]."""
        self._check(z, self.latent_channels, "decode")
        b, c, f, h, w = z.shape
        x = F.pixel_shuffle((z + self.shift).transpose(1, 2).reshape(b * f, c, h, w), self.factor)
        x = x.reshape(b, f, *x.shape[1:]).transpose(1, 2)
        return DecoderOutput(sample=x) if return_dict else (x,)
