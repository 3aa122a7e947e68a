"""Multi-scale VQVAE of VAR (FoundationVision/VAR, MIT), written clean-room from the architecture description.

Module and parameter names mirror the official ``vae_ch160v4096z32.pth`` (released with
https://github.com/FoundationVision/VAR; arXiv:2404.02905) so it loads key for key. Buffers of the official file
that carry no model state (``quantize.ema_vocab_hit_SV``, a training statistic) are not registered here and are
filtered on load.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 qkv conv (softmax scale C^-0.5)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        h = F.scaled_dot_product_attention(
            q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None], scale=C**-0.5
        )[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, attn: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == n - 1 and using_sa:
                    level.attn.append(AttnBlock(block_in))
            if i != n - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, using_mid_sa)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_channels: int = 3,
                 using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, using_mid_sa)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == n - 1 and using_sa:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # up[i] is level i, run from n-1 down to 0
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual conv φ(h) = (1 - r)·h + r·conv3x3(h), r = |quant_resi| (0.5 in the released VQVAE)."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def phi_ticks(num_phi: int) -> np.ndarray:
    """Scale positions in [0, 1] of the K shared φ convs (numpy float64, as the reference computes them)."""
    K = num_phi
    if K == 4:
        return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K)
    return np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_index_for_scale(si: int, num_scales: int, num_phi: int) -> int:
    """Index of the φ conv used at scale ``si``: ``argmin_k |ticks[k] - si/(SN-1)|`` in numpy float64.

    The float64 evaluation is part of the contract: for SN = 10, K = 4 the scales 2 and 7 are exact ties in real
    arithmetic and float64 resolves them to [0,0,1,1,1,2,2,3,3,3]; never recompute this in float32.
    """
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(num_phi) - at)).item())


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls


class VectorQuantizer2(nn.Module):
    """Multi-scale residual quantizer: codebook ``embedding`` and the shared φ convs ``quant_resi.qresi_ls``."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: Sequence[int], quant_resi: float,
                 share_quant_resi: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.patch_nums = tuple(patch_nums)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.quant_resi = PhiPartiallyShared(
            nn.ModuleList([Phi(z_channels, quant_resi) for _ in range(share_quant_resi)])
        )

    def phi(self, si: int) -> Phi:
        return self.quant_resi.qresi_ls[phi_index_for_scale(si, len(self.patch_nums), len(self.quant_resi.qresi_ls))]

    def _apply_phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        conv = self.phi(si)
        return conv(h.to(conv.weight.dtype)).float()

    def get_next_autoregressive_input(
        self, si: int, num_scales: int, f_hat: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s residual ``h`` (B, Cvae, pn, pn) into ``f_hat`` (fp32, in place); return the new
        ``f_hat`` and the next scale's (area-downsampled) input."""
        HW = self.patch_nums[-1]
        if si != num_scales - 1:
            f_hat.add_(self._apply_phi(si, F.interpolate(h.float(), size=(HW, HW), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self._apply_phi(si, h.float()))
        return f_hat, f_hat

    @torch.no_grad()
    def f_to_idx(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-scale residual quantisation of ``f`` (B, Cvae, H, W): token ids per scale (B, pn²) and ``f_hat``."""
        B, C, H, W = f.shape
        SN = len(self.patch_nums)
        f_rest = f.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        codebook = self.embedding.weight.float()
        ids = []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            dist = z.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * z @ codebook.T
            idx = dist.argmin(1).view(B, pn, pn)
            h = codebook[idx].permute(0, 3, 1, 2)
            if si != SN - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self._apply_phi(si, h)
            f_hat.add_(h)
            f_rest.sub_(h)
            ids.append(idx.reshape(B, -1))
        return ids, f_hat

    @torch.no_grad()
    def idx_to_var_input(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs (B, L - pn0², Cvae): ``area(f_hat, pn_{si+1})`` after each scale but the last."""
        B = ids[0].shape[0]
        HW = self.patch_nums[-1]
        SN = len(self.patch_nums)
        f_hat = torch.zeros(B, self.Cvae, HW, HW, device=ids[0].device)
        nxt = []
        for si in range(SN - 1):
            pn = self.patch_nums[si]
            h = self.embedding(ids[si]).float().transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, x = self.get_next_autoregressive_input(si, SN, f_hat, h)
            nxt.append(x.reshape(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1)


class VQVAE(ModelMixin, ConfigMixin):
    """VAR's multi-scale VQVAE. Defaults are the released ``vae_ch160v4096z32.pth`` (256 px, 16x down)."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ) -> None:
        super().__init__()
        if share_quant_resi < 1:
            raise ValueError(
                f"share_quant_resi={share_quant_resi}: only the partially shared φ layout (K >= 1 convs, "
                "'quantize.quant_resi.qresi_ls.*', as in the released VQVAE with K = 4) is supported"
            )
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    @property
    def downsample_ratio(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode_to_f(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> continuous latent ``f`` (B, Cvae, H/16, W/16)."""
        return self.quant_conv(self.encoder(img.to(self.dtype)))

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        ids, _ = self.quantize.f_to_idx(self.encode_to_f(img))
        return ids

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode ``f_hat`` to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat.to(self.dtype))).clamp(-1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the multi-scale quantizer (for checks; the pipeline decodes ``f_hat``)."""
        _, f_hat = self.quantize.f_to_idx(self.encode_to_f(img))
        return self.fhat_to_img(f_hat)
