"""FEAT (Full-dimensional Efficient Attention Transformer) as a diffusers model, trained from scratch.

A clean-room reimplementation of the architecture of Wang et al., "FEAT: Full-Dimensional Efficient Attention
Transformer for Medical Video Generation" (arXiv 2506.04956), following the public ``Yaziwel/FEAT`` layout:
per group, a spatial RWKV block (Bi-WKV over the row-major then the column-major frame grid), a temporal RWKV
block (Bi-WKV over frames), and a channel block (Restormer MDTA channel attention + gated-dconv FFN), all with
adaLN timestep conditioning; depthwise-conv token shift instead of RWKV's lerp; residual value guidance (RVG)
with zero-initialised mixing; no positional embedding.

Input ``hidden_states`` is (B, F, C, H, W) latents (CogVideoX's layout), of which the last ``use_image_num``
frames are independent images that skip temporal mixing. The output (B, F, out_channels, H, W) carries
``learn_sigma`` channels as in DiT/IDDPM. Submodule names mirror the official code (``blocks.{i}.att.key`` ...).

This is *not* a drop-in for a pretrained model: it must be trained (see ``demos/train_feat_toy.py``).
"""

from __future__ import annotations

import logging
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from ..kernels.biwkv import CUMSUM_MAX_DECAY, biwkv
from ._safe_load import load_checkpoint_without_code

__all__ = ["FEATTransformer3DModel", "FEAT_PRESETS", "feat_parameter_count"]

logger = logging.getLogger(__name__)

#: name -> (hidden_size, num_heads); both use 9 groups (18 RWKV blocks, 9 channel blocks), patch 2, mlp_ratio 4
FEAT_PRESETS: dict[str, dict] = {
    "FEAT-S": dict(hidden_size=512, num_heads=8),
    "FEAT-L": dict(hidden_size=1024, num_heads=16),
}


def feat_parameter_count(hidden_size: int, num_heads: int) -> int:
    """Parameters of the official 9-group, patch-2, 4-channel, learn-sigma FEAT (derived from its layer shapes)."""
    D = hidden_size
    return 597 * D * D + 3126 * D + 9 * num_heads + 72


def silu_prime(x: torch.Tensor) -> torch.Tensor:
    """FEAT's rescaled SiLU used in the timestep MLP and the RWKV/final adaLN (SiLU / 0.596)."""
    return F.silu(x) / 0.596


class SiLUPrime(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_prime(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid (cos half, then sin half; max period 1e4) -> Linear -> SiLU' -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), SiLUPrime(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, H'W', D)
        return self.proj(x).flatten(2).transpose(1, 2)


class GDFN(nn.Module):
    """Restormer gated-dconv FFN on a (N, D, H, W) grid: 1x1 -> 3x3 depthwise -> GELU gate -> 1x1 (no bias)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


def _tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _frames_to_time(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B*F, S, D) -> (B*S, F, D)."""
    bf, s, d = x.shape
    return x.view(b, bf // b, s, d).transpose(1, 2).reshape(b * s, bf // b, d)


def _time_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B*S, F, D) -> (B*F, S, D)."""
    bs, f, d = x.shape
    return x.view(b, bs // b, f, d).transpose(1, 2).reshape(b * f, bs // b, d)


class SpatialMix(nn.Module):
    """FEAT's ``VRWKV_SpatialMix``: conv shift, k/v/r projections, RVG, chained Bi-WKV scans, sigma(r) gate."""

    def __init__(self, dim: int, recurrence: int, *, delta: int = 0, backend: str | None = None):
        super().__init__()
        self.recurrence = recurrence
        self.delta = delta
        self.backend = backend
        self.dwconv2d = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.dwconv1d = nn.Conv1d(dim, dim, 3, padding=1, groups=dim, bias=False)  # used by temporal blocks only
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.spatial_decay = nn.Parameter(torch.randn(recurrence, dim))
        self.spatial_first = nn.Parameter(torch.randn(recurrence, dim))
        self.alpha = nn.Parameter(torch.zeros(2, dim))  # RVG mixing, zero-init: starts as plain WKV

    def _scan(self, k: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
        T = k.shape[1]
        decay = self.spatial_decay[j].clamp(-CUMSUM_MAX_DECAY, CUMSUM_MAX_DECAY)
        return biwkv(k, v, decay / T, self.spatial_first[j] / T, delta=self.delta, backend=self.backend)

    def forward(self, x: torch.Tensor, z: torch.Tensor, grid: tuple[int, int], batch: int) -> torch.Tensor:
        """``x``, ``z`` (N, T, D): N = B*F and T = H'W' (spatial) or N = B*H'W' and T = F (temporal)."""
        h, w = grid
        if self.recurrence == 2:  # spatial: shift on the frame grid
            x = _grid_to_tokens(self.dwconv2d(_tokens_to_grid(x, h, w))) + x
        else:  # temporal: per-frame 2-D shift, then 1-D shift along time
            xf = _time_to_frames(x, batch)
            xf = _grid_to_tokens(self.dwconv2d(_tokens_to_grid(xf, h, w))) + xf
            x = _frames_to_time(xf, batch)
            x = self.dwconv1d(x.transpose(1, 2)).transpose(1, 2) + x
        k = self.key(x)
        v = self.value(x)
        r = self.receptance(x)
        d = z - v  # RVG uses the original v
        v = v + self.alpha[0] * z
        o = self._scan(k, v, 0)
        if self.recurrence == 2:  # then the column-major scan, with scan 0's output as its values
            n, t, c = k.shape
            kc = k.view(n, h, w, c).transpose(1, 2).reshape(n, t, c)
            oc = o.view(n, h, w, c).transpose(1, 2).reshape(n, t, c)
            o = self._scan(kc, oc, 1).view(n, w, h, c).transpose(1, 2).reshape(n, t, c)
        o = o + self.alpha[1] * d
        return self.output(torch.sigmoid(r) * o)


class RWKVBlock(nn.Module):
    """Spatial (recurrence 2) or temporal (recurrence 1) block with adaLN-Zero (SiLU') and per-channel gammas."""

    def __init__(self, dim: int, recurrence: int, mlp_ratio: float, *, delta: int = 0, backend: str | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim, recurrence, delta=delta, backend=backend)
        self.ffn = GDFN(dim, mlp_ratio)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))
        self.adaLN_modulation = nn.Sequential(SiLUPrime(), nn.Linear(dim, 6 * dim))

    def forward(self, x, z, c, grid, batch):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + self.gamma1 * g1.unsqueeze(1) * self.att(modulate(self.ln1(x), sh1, sc1), z, grid, batch)
        y = modulate(self.ln2(x), sh2, sc2)
        h, w = grid
        if self.att.recurrence == 2:
            y = _grid_to_tokens(self.ffn(_tokens_to_grid(y, h, w)))
        else:  # the FFN always runs on the per-frame grid
            y = _frames_to_time(_grid_to_tokens(self.ffn(_tokens_to_grid(_time_to_frames(y, batch), h, w))), batch)
        return x + self.gamma2 * g2.unsqueeze(1) * y


class MDTA(nn.Module):
    """Restormer multi-Dconv-head transposed attention: a (D/h x D/h) channel softmax per head, linear in tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)
        self.alpha = nn.Parameter(torch.zeros(2 * dim))  # the official RVG hook, unused (kept for the state dict)

    def attention_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax map (N, h, D/h, D/h), v (N, h, D/h, HW)) of a (N, D, H, W) input."""
        n, d, hh, ww = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(n, self.num_heads, d // self.num_heads, hh * ww) for t in (q, k, v))
        q = F.normalize(q, dim=-1)  # along space
        k = F.normalize(k, dim=-1)
        return torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, hh, ww = x.shape
        attn, v = self.attention_map(x)
        return self.project_out((attn @ v).reshape(n, d, hh, ww))


class ChannelBlock(nn.Module):
    """Restormer ``TransformerBlockControl``: adaLN (plain SiLU, not zero-init), MDTA, GDFN, per frame."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MDTA(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = GDFN(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, grid):
        h, w = grid
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * _grid_to_tokens(self.attn(_tokens_to_grid(modulate(self.norm1(x), sh1, sc1), h, w)))
        y = _grid_to_tokens(self.ffn(_tokens_to_grid(modulate(self.norm2(x), sh2, sc2), h, w)))
        return x + g2.unsqueeze(1) * y


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(SiLUPrime(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FEATTransformer3DModel(ModelMixin, ConfigMixin):
    """The FEAT video diffusion transformer (unconditional). Presets: :meth:`from_preset` ("FEAT-S", "FEAT-L").

    Args:
        in_channels: latent channels (4 for SD-VAE latents).
        out_channels: defaults to ``2 * in_channels`` with ``learn_sigma`` else ``in_channels``.
        hidden_size, num_heads: width and channel-attention heads (the WKV mixers are per channel).
        num_groups: spatial + temporal + channel block groups (9 in both released models).
        wkv_delta: Bi-WKV distance offset (0 = FEAT's temporal kernel; 1 = Vision-RWKV's convention).
        wkv_backend: ``None`` (automatic: Triton on CUDA) or one of ``biwkv``'s backends.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 512,
        num_heads: int = 8,
        num_groups: int = 9,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        wkv_delta: int = 0,
        wkv_backend: str | None = None,
    ):
        super().__init__()
        self.out_ch = out_channels or (in_channels * 2 if learn_sigma else in_channels)
        D = hidden_size
        self.x_embedder = PatchEmbed(in_channels, D, patch_size)
        self.t_embedder = TimestepEmbedder(D)
        blocks = []
        for _ in range(num_groups):
            blocks.append(RWKVBlock(D, 2, mlp_ratio, delta=wkv_delta, backend=wkv_backend))
            blocks.append(RWKVBlock(D, 1, mlp_ratio, delta=wkv_delta, backend=wkv_backend))
        self.blocks = nn.ModuleList(blocks)
        self.restormers = nn.ModuleList([ChannelBlock(D, num_heads, mlp_ratio) for _ in range(num_groups)])
        self.final_layer = FinalLayer(D, patch_size, self.out_ch)
        self.res_conv = nn.Conv2d(in_channels, self.out_ch, 1)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FEATTransformer3DModel":
        if name not in FEAT_PRESETS:
            raise ValueError(f"unknown FEAT preset {name!r}; available: {', '.join(FEAT_PRESETS)}")
        return cls(**{**FEAT_PRESETS[name], **overrides})

    @classmethod
    def from_official_checkpoint(
        cls, checkpoint: str, preset: str = "FEAT-S", *, strict: bool = False, **overrides
    ) -> tuple["FEATTransformer3DModel", dict[str, list[str]]]:
        """Build ``preset`` and load an official ``Yaziwel/FEAT`` ``.pt`` state dict into it (approximately).

        ``checkpoint`` is a local path or ``"repo_id:filename"`` on the Hub (e.g. ``"WTHH031230/FEAT:FEAT_S_col.pt"``,
        needs internet). The ``.pt`` layout is unverified: ``"ema"``/``"model"``/``"state_dict"`` wrappers and a
        ``module.`` prefix are unwrapped and Restormer ``norm*.body.`` names mapped; non-tensor entries the
        training script stores beside the weights (its arguments) are read as inert placeholders, so no code from
        the file runs (torch's ``weights_only`` unpickler). Every key that still does not
        match is returned (and raises with ``strict=True``). Outputs also differ from the official code on the
        spatial path, whose CUDA kernel does not compute the exact Bi-WKV.
        Returns ``(model, {"missing": [...], "unexpected": [...], "shape_mismatch": [...]})``.
        """
        if ":" in checkpoint and not os.path.exists(checkpoint):
            from huggingface_hub import hf_hub_download

            repo_id, filename = checkpoint.split(":", 1)
            checkpoint = hf_hub_download(repo_id, filename)
        # The official train.py saves {"model", "ema", "opt", "args"}: "args" is the run's OmegaConf config, which
        # weights_only=True refuses; load it as an inert placeholder instead of executing anything from the file.
        sd = load_checkpoint_without_code(checkpoint)
        for key in ("ema", "model", "state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        model = cls.from_preset(preset, **overrides)
        own = model.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):  # e.g. a bare state dict saved with the run's args beside it
                continue
            k = k[len("module."):] if k.startswith("module.") else k
            k = re.sub(r"\.(norm1|norm2)\.body\.", r".\1.", k)
            mapped[k] = v
        report = {
            "missing": sorted(set(own) - set(mapped)),
            "unexpected": sorted(set(mapped) - set(own)),
            "shape_mismatch": sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape),
        }
        if strict and any(report.values()):
            raise ValueError(f"official FEAT checkpoint does not match {preset}: {report}")
        load = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(load, strict=False)
        if any(report.values()):
            logger.warning("FEAT checkpoint: %d missing, %d unexpected, %d shape-mismatched keys",
                           len(report["missing"]), len(report["unexpected"]), len(report["shape_mismatch"]))
        return model, report

    def initialize_weights(self) -> None:
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every RWKV block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        *,
        use_image_num: int = 0,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """``hidden_states`` (B, F, C, H, W), ``timestep`` (B,) or scalar -> (B, F, out_channels, H, W)."""
        if hidden_states.dim() != 5:
            raise ValueError(f"hidden_states must be (B, F, C, H, W); got {tuple(hidden_states.shape)}")
        B, Fr, C, H, W = hidden_states.shape
        p = self.config.patch_size
        if C != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} latent channels, got {C}")
        if H % p or W % p:
            raise ValueError(f"latent height/width {(H, W)} must be divisible by patch_size {p}")
        if not 0 <= use_image_num < Fr:
            raise ValueError(f"use_image_num must lie in [0, {Fr}), got {use_image_num}")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        h, w = H // p, W // p
        S = h * w
        Fv = Fr - use_image_num  # video frames; the rest are images that skip temporal mixing
        x_in = hidden_states.reshape(B * Fr, C, H, W)
        x = self.x_embedder(x_in)  # (B*F, S, D)
        z = x  # RVG source: the embedded noisy input, fed unchanged to every block
        t = self.t_embedder(timestep)  # (B, D)
        c_frames = t.repeat_interleave(Fr, 0)
        c_time = t.repeat_interleave(S, 0)
        z_time = _frames_to_time(z.view(B, Fr, S, -1)[:, :Fv].reshape(B * Fv, S, -1), B)
        for g in range(self.config.num_groups):
            x = self.blocks[2 * g](x, z, c_frames, (h, w), B)
            xv = x.view(B, Fr, S, -1)
            vid = _frames_to_time(xv[:, :Fv].reshape(B * Fv, S, -1), B)
            vid = self.blocks[2 * g + 1](vid, z_time, c_time, (h, w), B)
            vid = _time_to_frames(vid, B).view(B, Fv, S, -1)
            x = torch.cat([vid, xv[:, Fv:]], 1).reshape(B * Fr, S, -1) if use_image_num else vid.reshape(B * Fr, S, -1)
            x = self.restormers[g](x, c_frames, (h, w))
        x = self.final_layer(x, c_frames)  # (B*F, S, p*p*out)
        x = x.view(B * Fr, h, w, p, p, self.out_ch).permute(0, 5, 1, 3, 2, 4).reshape(B * Fr, self.out_ch, H, W)
        x = x + self.res_conv(x_in)
        out = x.view(B, Fr, self.out_ch, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
