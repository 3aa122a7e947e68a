"""FEAT-style linear attention for pretrained video DiTs (CogVideoX, HunyuanVideo). Requires distillation.

The method (config, per-layer parameters, the per-call math); installing, distilling and saving live in
:mod:`diffusers_attn.api.feat`.

**An experimental baseline, not a usable accelerator; there is no training-free FEAT drop-in.** FEAT's mixer
(Bi-WKV scans, channel attention) does not exist in a pretrained softmax model; this processor replaces the
video x video part of softmax attention by FEAT components and reproduces the teacher poorly until its new
parameters are distilled (:func:`distill_feat`), and not well after. Measured on the trained ``ref-cogvideox``:
after 200 layer-wise distillation steps the output scores 18.4 dB PSNR against the stock model's output, where the
stock model run with a different seed scores 16.4 dB; LoRA on top does not help; keeping half the layers on
softmax (``softmax_layers``) gives 20.2 dB. The reason is structural: the video x video weights (decays by
distance, key gains) do not depend on the query, so a layer can mix tokens by position but not by content.

Per attention layer, on the model's own q, k, v (after its QK-norm and RoPE) and its own output projection:

* **Text queries** attend to all keys by exact softmax (L_text x N: linear in N).
* **Video queries** get an exact softmax partial over the text keys and a FEAT partial over the video tokens:
  an optional depthwise 3-D conv shift of v, then chained Bi-WKV scans along W, H and T of the latent grid
  (each scan's output is the next one's values; k re-used; learnable per-channel decay and bonus, not
  normalised by length: the exact chunked / Triton forms), plus an optional MDTA-style channel-attention term
  (zero-initialised mix). Both partials are normalised sums, merged through their log-masses with a learnable
  per-head log-scale on the FEAT branch (the FlashAttention partial merge).
* **Hybrid mode**: layers in ``softmax_layers`` keep the stock attention (bit for bit).

New parameters per layer (``H`` heads x ``D`` head_dim): decay and bonus (3 x H D), a key gain (H D), the
log-scale, channel-attention temperature and mix (H each), and the conv shift (27 H D): ~0.2% of a CogVideoX
block. Usage::

    apply_feat(pipe, FEATConfig(softmax_layers=(0, 1)))
    report = distill_feat(pipe, inputs=collect_transformer_inputs(pipe, prompt_embeds=..., num_inference_steps=10))
    print(report)          # per-layer relative error before / after
    save_feat_adapter(pipe, "feat_adapter")   # later: apply_feat(pipe, ...); load_feat_adapter(pipe, "feat_adapter")
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.biwkv import biwkv, select_biwkv_backend
from ...layout import TokenLayout
from ..base import NOT_COUNTED, CallInfo, MethodRecord, dense_record

logger = logging.getLogger(__name__)

_SCAN_AXES = ("w", "h", "t")


@dataclass
class FEATConfig:
    """Configuration of the FEAT processor.

    Args:
        softmax_layers: Layer indices (installation order) that keep the stock softmax attention (hybrid mode).
        scans: Grid axes scanned by Bi-WKV, in order (subset/permutation of ``("w", "h", "t")``).
        decay_init: Initial per-token decay ``w`` of every scan (> 0: local; e^{-w} per token of distance).
        channel_attention: Add the MDTA-style channel-attention term (zero-initialised mix).
        conv_shift: Depthwise 3x3x3 conv shift of v before the scans (zero-initialised residual).
        delta: Bi-WKV distance offset (0 or 1).
        chunk: Chunk length of the Bi-WKV (PyTorch chunked form / Triton program); ``None``: the defaults.
        backend: Bi-WKV backend (``None``: Triton on CUDA, else PyTorch).
    """

    softmax_layers: tuple[int, ...] = ()
    scans: tuple[str, ...] = _SCAN_AXES
    decay_init: float = 0.5
    channel_attention: bool = True
    conv_shift: bool = True
    delta: int = 0
    chunk: int | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        self.softmax_layers = tuple(int(i) for i in self.softmax_layers)
        self.scans = tuple(self.scans)
        if any(i < 0 for i in self.softmax_layers):
            raise ValueError(f"softmax_layers must be non-negative layer indices, got {self.softmax_layers}")
        bad = [s for s in self.scans if s not in _SCAN_AXES]
        if bad or len(set(self.scans)) != len(self.scans) or not self.scans:
            raise ValueError(f"scans must be distinct axes from {_SCAN_AXES}, got {self.scans}")
        if self.delta not in (0, 1):
            raise ValueError(f"delta must be 0 or 1, got {self.delta}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk must be positive, got {self.chunk}")


class FEATLayer(nn.Module):
    """The new parameters of one attention layer and its video x video FEAT mixer."""

    def __init__(self, heads: int, head_dim: int, config: FEATConfig):
        super().__init__()
        C = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.config = config
        n = len(config.scans)
        self.decay = nn.Parameter(torch.full((n, C), float(config.decay_init)))
        self.bonus = nn.Parameter(torch.zeros(n, C))
        self.key_gain = nn.Parameter(torch.ones(C))
        self.log_scale = nn.Parameter(torch.zeros(heads))
        if config.channel_attention:
            self.chan_temperature = nn.Parameter(torch.ones(heads))
            self.chan_mix = nn.Parameter(torch.zeros(heads))
        if config.conv_shift:
            self.shift = nn.Parameter(torch.zeros(C, 1, 3, 3, 3))

    def video_mix(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """FEAT mixing of the video tokens: (B, H, Nv, D) each -> (B, H, Nv, D) fp32 (a normalised mix of v)."""
        cfg = self.config
        B, H, Nv, D = v.shape
        T, Hh, Ww = grid
        C = H * D
        # channels-last grid (B, T, Hh, Ww, C), channel = h * D + d
        kg = (k.float().permute(0, 2, 1, 3).reshape(B, T, Hh, Ww, C)) * self.key_gain
        vg = v.float().permute(0, 2, 1, 3).reshape(B, T, Hh, Ww, C)
        if cfg.conv_shift:
            vc = vg.permute(0, 4, 1, 2, 3)
            vg = vg + F.conv3d(vc, self.shift, padding=1, groups=C).permute(0, 2, 3, 4, 1)
        o = vg
        dims = {"t": 1, "h": 2, "w": 3}
        for j, axis in enumerate(cfg.scans):
            dim = dims[axis]
            kx = kg.movedim(dim, 3)  # scanned axis next to channels
            ox = o.movedim(dim, 3)
            shp = ox.shape
            L = shp[3]
            out = biwkv(kx.reshape(-1, L, C), ox.reshape(-1, L, C), self.decay[j], self.bonus[j],
                        delta=cfg.delta, backend=cfg.backend, chunk=cfg.chunk)
            o = out.float().reshape(shp).movedim(3, dim)
        o = o.reshape(B, Nv, H, D).permute(0, 2, 1, 3)
        if cfg.channel_attention:
            qn = F.normalize(q.float(), dim=2)  # along tokens, per channel (MDTA)
            kn = F.normalize(k.float(), dim=2)
            attn = torch.softmax(qn.transpose(-2, -1) @ kn * self.chan_temperature.view(1, H, 1, 1), dim=-1)
            oc = v.float() @ attn.transpose(-2, -1)  # (B, H, Nv, D): token-wise channel mixing
            o = o + self.chan_mix.view(1, H, 1, 1) * oc
        return o


class FEATMethod(nn.Module):
    """The FEAT attention method (holds every layer's new parameters; one instance per transformer).

    ``mode``: ``"run"`` (FEAT output), ``"teacher"`` (stock output), ``"distill"`` (returns the stock output
    and back-propagates the layer's MSE to its FEAT parameters), ``"measure"`` (stock output; records the
    relative error of FEAT per layer).
    """

    name = "feat"

    def __init__(self, config: FEATConfig, layer_shapes: list[tuple[int, int]]):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([FEATLayer(h, d, config) for h, d in layer_shapes])
        self.layer_shapes = list(layer_shapes)
        self.mode = "run"
        self.errors: dict[int, list[float]] = {}

    # ------------------------------------------------------------------ math
    def feat_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
        key_padding_mask: torch.Tensor | None, layer_index: int, scale: float | None = None,
    ) -> torch.Tensor:
        """The FEAT output (B, H, N, D) for one layer (float32 inside, ``q.dtype`` out)."""
        B, H, N, D = q.shape
        layer = self.layers[layer_index]
        if (H, D) != (layer.heads, layer.head_dim):
            raise ValueError(
                f"FEAT layer {layer_index} was built for {layer.heads}x{layer.head_dim} heads, got {H}x{D}"
            )
        sc = scale if scale is not None else 1.0 / math.sqrt(D)
        v0, v1 = layout.video_offset, layout.video_offset + layout.num_video
        t0, t1 = layout.text_offset, layout.text_offset + layout.text_len
        qv, kv, vv = q[:, :, v0:v1], k[:, :, v0:v1], v[:, :, v0:v1]
        o_vid = layer.video_mix(kv, vv, qv, layout.grid)  # (B, H, Nv, D) fp32
        out = q.new_empty(B, H, N, D)
        if layout.text_len:
            kt, vt = k[:, :, t0:t1].float(), v[:, :, t0:t1].float()
            s = (qv.float() @ kt.transpose(-2, -1)) * sc  # (B, H, Nv, L): exact video -> text scores
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask[:, None, None, t0:t1], float("-inf"))
            lse_t = torch.logsumexp(s, dim=-1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(lse_t), lse_t, torch.zeros_like(lse_t)))
            o_txt = p @ vt
            lv = layer.log_scale.view(1, H, 1, 1) + math.log(layout.num_video)
            a = torch.sigmoid(lse_t - lv)  # share of the text partial; 0 when every text key is padded
            out[:, :, v0:v1] = (a * o_txt + (1 - a) * o_vid).to(q.dtype)
            mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
            out[:, :, t0:t1] = F.scaled_dot_product_attention(q[:, :, t0:t1], k, v, attn_mask=mask, scale=scale)
        else:
            out[:, :, v0:v1] = o_vid.to(q.dtype)
        return out

    # ------------------------------------------------------------------ protocol
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
        call: CallInfo,
        dense_fn: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, MethodRecord | None]:
        B, H, N, D = q.shape
        layer_index = call.layer_index
        if N != layout.seq_len:
            raise ValueError(f"FEAT: sequence length {N} does not match the layout {layout}")
        if layer_index >= len(self.layers):
            raise ValueError(f"FEAT: layer {layer_index} has no parameters ({len(self.layers)} layers were built)")
        if self.layers[layer_index].decay.device != q.device:  # the pipeline was moved after apply_feat
            logger.info("FEAT: moving the adapter parameters to %s", q.device)
            self.to(q.device)
        n_valid = float(key_padding_mask.sum()) if key_padding_mask is not None else float(N) * B
        if layer_index in self.config.softmax_layers:
            return dense_fn(), dense_record("softmax layer (FEATConfig.softmax_layers)", batch=B, heads=H,
                                            head_dim=D, n_q=N, n_k_valid=n_valid, n_video=layout.num_video)
        if key_padding_mask is not None:
            vm = key_padding_mask[:, layout.video_offset: layout.video_offset + layout.num_video]
            if not bool(vm.all()):
                raise ValueError("FEAT: padded video tokens are not supported (only text may be padded)")
        if self.mode == "teacher":
            return dense_fn(), None
        if self.mode in ("distill", "measure"):
            target = dense_fn()
            with torch.enable_grad() if self.mode == "distill" else torch.no_grad():
                pred = self.feat_attention(q.detach(), k.detach(), v.detach(), layout, key_padding_mask,
                                           layer_index, scale)
                err = (pred.float() - target.detach().float()).pow(2).mean() / target.detach().float().pow(2).mean()
                if self.mode == "distill":
                    err.backward()
            self.errors.setdefault(layer_index, []).append(float(err))
            return target, None
        out = self.feat_attention(q, k, v, layout, key_padding_mask, layer_index, scale)
        return out, self._record(layer_index, q, layout, n_valid)

    def _record(self, layer_index: int, q: torch.Tensor, layout: TokenLayout, n_valid: float) -> MethodRecord:
        B, H, N, D = q.shape
        L = layout.text_len
        # exact softmax pairs: text queries x all keys, video queries x text keys
        computed = float(L) * n_valid * H * D + float(layout.num_video) * L * B * H * D
        backend = select_biwkv_backend(q[0].transpose(0, 1), self.layers[layer_index].decay[0], self.config.backend)
        return MethodRecord(
            head_patterns=np.full((B, H), NOT_COUNTED, dtype=np.int64),  # no sparse pattern
            computed=computed, total=float(N) * n_valid * H * D,
            video_computed=0.0, video_total=float(layout.num_video) ** 2 * B * H * D,
            kernel="biwkv-triton" if backend == "triton" else "biwkv-torch",
            info={"feat": "video x video by Bi-WKV scans; text exact softmax"},
        )
