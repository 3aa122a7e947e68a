"""VAR transformer (next-scale prediction; FoundationVision/VAR, MIT), written clean-room.

Parameter names and shapes mirror the released ``var_d{16,20,24,30,36}.pth`` (arXiv:2404.02905). Every attention
module (:class:`VARSelfAttention`) takes a processor, and the model exposes diffusers' ``attn_processors`` /
``set_attn_processor`` (via ``AttentionMixin``), so LiteVAR and later methods swap in per module.

Buffers of the official file that are pure functions of the config (``lvl_1L``, ``attn_bias_for_masking``,
``blocks.*.attn.zero_k_bias``) are registered ``persistent=False`` here and filtered when loading.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def linear_with_bias(linear: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear(x)`` with a replacement bias; quantized wrappers (LiteVAR) implement ``forward_with_bias``."""
    fwb = getattr(linear, "forward_with_bias", None)
    if fwb is not None:
        return fwb(x, bias)
    return F.linear(x, linear.weight, bias)


class VARAttnProcessor:
    """Dense VAR attention: fused qkv with (q, 0, v) bias, optional l2-normalised q/k, KV cache, SDPA.

    ``attn_bias`` is the block-causal additive bias of the teacher-forced forward (None at inference, where the
    KV cache gives the same visibility).
    """

    name = "dense"

    def qkv(self, attn: "VARSelfAttention", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) as (B, H, L, D), K/V extended by the cache when caching is on."""
        B, L, C = x.shape
        bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
        qkv = linear_with_bias(attn.mat_qkv, x, bias).view(B, L, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if attn.attn_l2_norm:
            scale_mul = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if attn.caching:
            if attn.cached_k is not None:
                k = torch.cat((attn.cached_k, k), dim=2)
                v = torch.cat((attn.cached_v, v), dim=2)
            attn.cached_k, attn.cached_v = k, v
        return q, k, v

    def out(self, attn: "VARSelfAttention", o: torch.Tensor) -> torch.Tensor:
        B, H, L, D = o.shape
        return attn.proj(o.transpose(1, 2).reshape(B, L, H * D))

    def __call__(self, attn: "VARSelfAttention", x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        q, k, v = self.qkv(attn, x)
        bias = None if attn_bias is None else attn_bias.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        return self.out(attn, o)


class VARSelfAttention(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.block_idx = block_idx
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim), persistent=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None
        self.processor: Any = VARAttnProcessor()

    def kv_caching(self, enable: bool) -> None:
        """Enable (and clear) or disable the KV cache."""
        self.caching = enable
        self.cached_k = self.cached_v = None

    def get_processor(self) -> Any:
        return self.processor

    def set_processor(self, processor: Any) -> None:
        self.processor = processor

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.processor(self, x, attn_bias=attn_bias, **kwargs)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.out_features // 6)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float,
                 norm_eps: float, shared_aln: bool, attn_l2_norm: bool) -> None:
        super().__init__()
        self.C = embed_dim
        self.attn = VARSelfAttention(block_idx, embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None = None,
                **attn_kwargs: Any) -> torch.Tensor:
        if self.shared_aln:
            mods = (self.ada_gss + cond).unbind(2)  # cond is (B, 1, 6, C) from shared_ada_lin
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        x = x + self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias, **attn_kwargs).mul_(gamma1)
        x = x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# Official depths (256 px unless noted); heads = depth, width = 64 * depth.
VAR_DEPTHS = (16, 20, 24, 30, 36)


class VARTransformer(ModelMixin, ConfigMixin, AttentionMixin):
    """VAR class-conditional next-scale transformer. ``VARTransformer.for_depth(30)`` is ``var_d30.pth``'s config."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        depth: int = 16,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        num_classes: int = 1000,
        vocab_size: int = 4096,
        z_channels: int = 32,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
    ) -> None:
        super().__init__()
        C = embed_dim or 64 * depth
        H = num_heads or depth
        self.C, self.D, self.num_heads = C, C, H
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        self.word_embed = nn.Linear(z_channels, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C).normal_(std=math.sqrt(1 / C / 3)))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C).normal_(std=math.sqrt(1 / C / 3)))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L)
        self.register_buffer("lvl_1L", lvl, persistent=False)
        causal = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf).view(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", causal, persistent=False)
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(i, C, C, H, mlp_ratio, norm_eps, shared_aln, attn_l2_norm) for i in range(depth)
        )
        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    @classmethod
    def for_depth(cls, depth: int, **kwargs: Any) -> "VARTransformer":
        """The released configuration for ``depth`` (36 is the 512-px ``var_d36.pth`` with shared AdaLN)."""
        if depth not in VAR_DEPTHS:
            raise ValueError(f"depth {depth}: released VAR checkpoints have depth in {VAR_DEPTHS}")
        if depth == 36:
            kwargs.setdefault("shared_aln", True)
            kwargs.setdefault("patch_nums", (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
        return cls(depth=depth, **kwargs)

    def rebuild_derived_buffers(self) -> None:
        """Recompute the config-derived buffers on the parameters' device (after a meta-device construction)."""
        dev = self.pos_1LC.device
        lvl = torch.cat([torch.full((pn * pn,), i, device=dev) for i, pn in enumerate(self.patch_nums)]).view(1, -1)
        self.lvl_1L = lvl
        self.attn_bias_for_masking = torch.where(
            lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf
        ).view(1, 1, self.L, self.L).to(device=dev)
        for b in self.blocks:
            b.attn.zero_k_bias = torch.zeros(self.C, device=dev, dtype=b.attn.q_bias.dtype)

    # ----- helpers shared by both forwards -----
    def kv_caching(self, enable: bool) -> None:
        for b in self.blocks:
            b.attn.kv_caching(enable)

    def lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def block_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.shared_ada_lin(cond) if self.config.shared_aln else cond

    def get_logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head in fp32 when the model is fp32; in low precision the head runs in the model dtype and the logits
        are returned in fp32 (like the reference under autocast)."""
        dt = self.pos_1LC.dtype  # the model dtype (head.weight may be int8-converted away)
        return self.head(self.head_nm(x.float().to(dt), cond.to(dt))).float()

    def class_cond(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_emb(labels)

    def first_input(self, cond: torch.Tensor) -> torch.Tensor:
        B = cond.shape[0]
        sos = cond[:, None].expand(B, self.first_l, -1)
        return sos + self.pos_start.expand(B, -1, -1) + self.lvl_pos()[:, : self.first_l]

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None = None,
                   **attn_kwargs: Any) -> torch.Tensor:
        """All blocks. ``attn_kwargs`` (``scale_idx``, ``cfg_batch``) are passed to every attention processor."""
        c = self.block_cond(cond)
        for b in self.blocks:
            x = b(x, c, attn_bias, **attn_kwargs)
        return x

    def forward(self, class_labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                label_drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced forward under the block-causal mask: logits (B, L', V) for the first L' tokens.

        ``x_BLCv_wo_first_l`` (B, L' - 1, Cvae) are the teacher inputs (``VQVAE.quantize.idx_to_var_input``).
        ``label_drop_mask`` (bool, B) replaces those labels by the null class (the reference drops labels with
        ``torch.rand`` even in eval mode; here it is explicit and off by default).
        """
        if label_drop_mask is not None:
            class_labels = torch.where(label_drop_mask, torch.full_like(class_labels, self.num_classes), class_labels)
        cond = self.class_cond(class_labels)
        ed = self.first_l + x_BLCv_wo_first_l.shape[1]
        if ed > self.L:
            raise ValueError(f"{ed} tokens given, the model has L = {self.L}")
        x = self.first_input(cond)
        x = torch.cat((x, self.word_embed(x_BLCv_wo_first_l.to(x.dtype)) + self.lvl_pos()[:, self.first_l : ed]), 1)
        bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        x = self.run_blocks(x, cond, bias, scale_idx=None, cfg_batch=False)
        return self.get_logits(x, cond)
