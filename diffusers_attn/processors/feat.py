"""FEAT-style linear attention for pretrained video DiTs (CogVideoX, HunyuanVideo). Requires distillation.

**There is no training-free FEAT drop-in.** FEAT's mixer (Bi-WKV scans, channel attention) does not exist in a
pretrained softmax model; this processor replaces the video x video part of softmax attention by FEAT components
and reproduces the teacher poorly until its new parameters are distilled (:func:`distill_feat`).

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

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.cogvideox import CogVideoXAttnProcessor
from ..adapters.hunyuan_video import HunyuanVideoAttnProcessor
from ..kernels.biwkv import biwkv, select_biwkv_backend
from ..layout import TokenLayout
from .base import record_dense_fallback

if TYPE_CHECKING:
    from ..context import AttentionContext

logger = logging.getLogger(__name__)

__all__ = [
    "FEATConfig",
    "FEATMethod",
    "FEATLayer",
    "FEATAttnProcessor",
    "FEATCogVideoXAttnProcessor",
    "FEATHunyuanVideoAttnProcessor",
    "FEATDistillReport",
    "apply_feat",
    "distill_feat",
    "collect_transformer_inputs",
    "save_feat_adapter",
    "load_feat_adapter",
    "get_feat_method",
    "remove_feat_lora",
]

_SCAN_AXES = ("w", "h", "t")
_ADAPTER_FILE = "feat_adapter.safetensors"
_CONFIG_FILE = "feat_adapter.json"


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
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: TokenLayout,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
        layer_index: int,
        context: "AttentionContext",
        dense_fn: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        B, H, N, D = q.shape
        if N != layout.seq_len:
            raise ValueError(f"FEAT: sequence length {N} does not match the layout {layout}")
        if layer_index >= len(self.layers):
            raise ValueError(f"FEAT: layer {layer_index} has no parameters ({len(self.layers)} layers were built)")
        if self.layers[layer_index].decay.device != q.device:  # the pipeline was moved after apply_feat
            logger.info("FEAT: moving the adapter parameters to %s", q.device)
            self.to(q.device)
        n_valid = float(key_padding_mask.sum()) if key_padding_mask is not None else float(N) * B
        if layer_index in self.config.softmax_layers:
            record_dense_fallback(context, layer_index, "softmax layer (FEATConfig.softmax_layers)", batch=B,
                                  heads=H, head_dim=D, n_q=N, n_k_valid=n_valid, n_video=layout.num_video)
            return dense_fn()
        if key_padding_mask is not None:
            vm = key_padding_mask[:, layout.video_offset: layout.video_offset + layout.num_video]
            if not bool(vm.all()):
                raise ValueError("FEAT: padded video tokens are not supported (only text may be padded)")
        if self.mode == "teacher":
            return dense_fn()
        if self.mode in ("distill", "measure"):
            target = dense_fn()
            with torch.enable_grad() if self.mode == "distill" else torch.no_grad():
                pred = self.feat_attention(q.detach(), k.detach(), v.detach(), layout, key_padding_mask,
                                           layer_index, scale)
                err = (pred.float() - target.detach().float()).pow(2).mean() / target.detach().float().pow(2).mean()
                if self.mode == "distill":
                    err.backward()
            self.errors.setdefault(layer_index, []).append(float(err))
            return target
        out = self.feat_attention(q, k, v, layout, key_padding_mask, layer_index, scale)
        self._record(context, layer_index, q, layout, key_padding_mask)
        return out

    def _record(self, context, layer_index, q, layout, key_padding_mask) -> None:
        B, H, N, D = q.shape
        n_valid = float(key_padding_mask.sum()) if key_padding_mask is not None else float(N) * B
        L = layout.text_len
        # exact softmax pairs: text queries x all keys, video queries x text keys
        computed = float(L) * n_valid * H * D + float(layout.num_video) * L * B * H * D
        context.stats.record(
            layer_index, head_patterns=np.full((B, H), -1, dtype=np.int64),  # no sparse pattern: not counted
            computed=computed, total=float(N) * n_valid * H * D,
            video_computed=0.0, video_total=float(layout.num_video) ** 2 * B * H * D,
        )
        backend = select_biwkv_backend(q[0].transpose(0, 1), self.layers[layer_index].decay[0], self.config.backend)
        context.stats.kernel_calls["biwkv-triton" if backend == "triton" else "biwkv-torch"] += 1
        context.stats.info["feat"] = "video x video by Bi-WKV scans; text exact softmax"


# ---------------------------------------------------------------------- processors
class FEATAttnProcessor:
    """Marker base of the FEAT processors (one subclass per model family). Build one with :meth:`for_transformer`
    or let :func:`apply_feat` install them; they compute q/k/v/out exactly as the stock processor."""

    @staticmethod
    def for_transformer(transformer: nn.Module, method: FEATMethod, layer_index: int,
                        context: "AttentionContext | None" = None) -> "FEATAttnProcessor":
        from ..adapters import get_adapter

        return _processor_cls(get_adapter(transformer))(method, layer_index=layer_index, context=context)

    @property
    def feat_layer(self) -> FEATLayer:
        return self.method.layers[self.layer_index]


class FEATCogVideoXAttnProcessor(FEATAttnProcessor, CogVideoXAttnProcessor):
    """FEAT on ``CogVideoXTransformer3DModel`` ([text, video]; text unmasked)."""


class FEATHunyuanVideoAttnProcessor(FEATAttnProcessor, HunyuanVideoAttnProcessor):
    """FEAT on ``HunyuanVideoTransformer3DModel`` ([video, text]; padded text masked)."""


_PROCESSORS: dict[str, type] = {"cogvideox": FEATCogVideoXAttnProcessor,
                                 "hunyuan_video": FEATHunyuanVideoAttnProcessor}


def _processor_cls(adapter) -> type:
    """The FEAT processor class of an adapter. Families registered later (e.g. Open-Sora) get a FEAT subclass of
    their own adapter processor: every adapter hands methods the same (q, k, v, layout, dense_fn) contract."""
    cls = _PROCESSORS.get(adapter.name)
    if cls is None:
        base = adapter.processor_cls
        from ..adapters.base import AcceleratedAttnProcessor

        if not (isinstance(base, type) and issubclass(base, AcceleratedAttnProcessor)):
            raise ValueError(f"FEAT cannot wrap {adapter.transformer_class_name}: its adapter has no method processor")
        cls = _PROCESSORS[adapter.name] = type(f"FEAT{base.__name__}", (FEATAttnProcessor, base), {})
    return cls


def _processor_factory(adapter, method, layer_index, context, original):
    proc = _processor_cls(adapter)(method, layer_index=layer_index, context=context)
    for attr in ("_attention_backend", "_parallel_config"):
        if getattr(original, attr, None) is not None:
            setattr(proc, attr, getattr(original, attr))
    return proc


def _layer_shapes(transformer: nn.Module, keys: list[str]) -> list[tuple[int, int]]:
    shapes = []
    for key in keys:
        attn = transformer.get_submodule(key[: -len(".processor")])
        heads = attn.heads
        inner = attn.to_q.out_features if getattr(attn, "to_q", None) is not None else attn.inner_dim
        shapes.append((heads, inner // heads))
    return shapes


def apply_feat(pipe_or_model: Any, config: FEATConfig | None = None) -> "AttentionContext":
    """Install the FEAT processor on a CogVideoX or HunyuanVideo pipeline (or bare transformer).

    The new parameters start untrained: the output is poor until :func:`distill_feat` (or a loaded adapter,
    :func:`load_feat_adapter`). Returns the transformer's :class:`AttentionContext`; the method is
    ``get_feat_method(pipe)``.
    """
    from ..adapters import get_adapter
    from ..install import install_method, resolve_transformer

    config = config if config is not None else FEATConfig()
    if not isinstance(config, FEATConfig):
        raise TypeError(f"config must be a FEATConfig, got {type(config).__name__}")
    transformer, _ = resolve_transformer(pipe_or_model)
    adapter = get_adapter(transformer)
    _processor_cls(adapter)  # an adapter without a method processor: say so before building anything
    from ..adapters.base import AcceleratedAttnProcessor

    keys = adapter.attention_layer_keys(dict(transformer.attn_processors), allow_replacing=(AcceleratedAttnProcessor,))
    shapes = _layer_shapes(transformer, keys)
    bad = [i for i in config.softmax_layers if i >= len(keys)]
    if bad:
        raise ValueError(f"softmax_layers {bad} out of range: the model has {len(keys)} attention layers")
    param = next(transformer.parameters())
    method = FEATMethod(config, shapes).to(param.device)
    return install_method(pipe_or_model, method, processor_factory=_processor_factory)


def get_feat_method(pipe_or_model: Any) -> FEATMethod:
    from ..install import installed_state

    state = installed_state(pipe_or_model)
    if state is None or not isinstance(state.method, FEATMethod):
        raise ValueError("diffusers-attn: FEAT is not installed on this model (call apply_feat first)")
    return state.method


# ---------------------------------------------------------------------- distillation
def collect_transformer_inputs(pipe: Any, **pipeline_kwargs: Any) -> list[dict[str, Any]]:
    """Run ``pipe(**pipeline_kwargs)`` with the *stock* attention and return every transformer call's keyword
    inputs (detached, on their device): hidden states along the teacher's own sampling trajectory."""
    from ..install import installed_state

    transformer = pipe.transformer
    state = installed_state(pipe)
    method = state.method if state is not None and isinstance(state.method, FEATMethod) else None
    prev = method.mode if method is not None else None
    if method is not None:
        method.mode = "teacher"
    captured: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        if args:
            raise ValueError("collect_transformer_inputs expects the pipeline to call the transformer by keyword")
        captured.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else
                             tuple(t.detach().clone() for t in v) if isinstance(v, tuple) and v
                             and all(isinstance(t, torch.Tensor) for t in v) else v)
                         for k, v in kwargs.items() if k != "return_dict"})

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**pipeline_kwargs)
    finally:
        handle.remove()
        if method is not None:
            method.mode = prev
    return captured


@dataclass
class FEATDistillReport:
    """Per-layer relative MSE ``||feat - softmax||^2 / ||softmax||^2`` of the attention output on the teacher's
    hidden states, before and after distillation (softmax layers are absent), and the training losses."""

    before: dict[int, float]
    after: dict[int, float]
    losses: list[float] = field(default_factory=list)
    lora_losses: list[float] = field(default_factory=list)

    def worst_layers(self, n: int) -> list[int]:
        """The ``n`` layers with the largest error after distillation: candidates for ``softmax_layers``."""
        return sorted(sorted(self.after, key=lambda i: -self.after[i])[:n])

    def __str__(self) -> str:
        lines = ["FEAT distillation: layer  error before -> after"]
        for i in sorted(self.before):
            lines.append(f"  {i:3d}  {self.before[i]:.4f} -> {self.after.get(i, float('nan')):.4f}")
        return "\n".join(lines)


def _call(transformer: nn.Module, inputs: dict[str, Any]):
    return transformer(**inputs, return_dict=False)[0]


def _measure(transformer, method, inputs) -> dict[int, float]:
    method.mode, method.errors = "measure", {}
    with torch.no_grad():
        for batch in inputs:
            _call(transformer, batch)
    return {i: float(np.mean(e)) for i, e in method.errors.items()}


def distill_feat(
    pipe_or_model: Any,
    inputs: Iterable[dict[str, Any]],
    *,
    steps: int = 200,
    lr: float = 1e-2,
    lora_rank: int = 0,
    lora_steps: int = 0,
    lora_lr: float = 1e-4,
    progress: bool = True,
) -> FEATDistillReport:
    """Distil the installed FEAT parameters to match the frozen softmax attention (LoLCATs-style).

    Stage 1 (``steps``): every FEAT layer is trained on its own to minimise the relative MSE between its output
    and the stock softmax output, on the teacher's hidden states (the forward keeps the stock outputs, so layer
    inputs follow the teacher). ``inputs`` are transformer keyword-argument dicts, e.g. from
    :func:`collect_transformer_inputs`, cycled over the steps. Stage 2 (``lora_steps`` > 0, ``lora_rank`` > 0):
    LoRA adapters on the attention projections plus the FEAT parameters are trained end to end so that the
    transformer's output with FEAT matches the stock output. Only new parameters are trained.
    """
    from ..install import resolve_transformer

    transformer, _ = resolve_transformer(pipe_or_model)
    method = get_feat_method(transformer)
    inputs = list(inputs)
    if not inputs:
        raise ValueError("distill_feat needs at least one transformer input dict")
    if steps < 0 or lora_steps < 0:
        raise ValueError("steps and lora_steps must be non-negative")
    if lora_steps and lora_rank <= 0:
        raise ValueError("lora_steps > 0 needs lora_rank > 0")
    was_training = transformer.training
    transformer.eval()
    frozen = [(p, p.requires_grad) for p in transformer.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    bar = _progress(steps + lora_steps, progress)
    report = FEATDistillReport(before=_measure(transformer, method, inputs), after={})
    try:
        opt = torch.optim.Adam(method.parameters(), lr=lr)
        for step in range(steps):
            method.mode, method.errors = "distill", {}
            with torch.no_grad():
                _call(transformer, inputs[step % len(inputs)])
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(np.mean([e[0] for e in method.errors.values()])) if method.errors else 0.0
            report.losses.append(loss)
            bar.update(1)
            bar.set_postfix(stage=1, err=f"{loss:.4f}")
        if lora_steps:
            lora = add_lora(transformer, method, rank=lora_rank)
            params = list(method.parameters()) + [p for m in lora for p in (m.lora_a, m.lora_b)]
            opt = torch.optim.Adam(params, lr=lora_lr)
            for step in range(lora_steps):
                batch = inputs[step % len(inputs)]
                with torch.no_grad():
                    _set_lora(lora, False)
                    method.mode = "teacher"
                    target = _call(transformer, batch)
                _set_lora(lora, True)
                method.mode = "run"
                with torch.enable_grad():
                    pred = _call(transformer, batch)
                    loss = (pred.float() - target.float()).pow(2).mean() / target.float().pow(2).mean()
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                report.lora_losses.append(float(loss))
                bar.update(1)
                bar.set_postfix(stage=2, err=f"{float(loss):.4f}")
        report.after = _measure(transformer, method, inputs)
    finally:
        method.mode = "run"
        bar.close()
        for p, req in frozen:
            p.requires_grad_(req)
        transformer.train(was_training)
    return report


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="distill_feat")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with B zero-initialised (so it starts as ``base``); base stays frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        dev = base.weight.device
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=dev) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = (alpha or rank) / rank
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:  # processors read .weight.dtype / shapes of the projection
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + (x.to(self.lora_a.dtype) @ self.lora_a.t() @ self.lora_b.t()).to(y.dtype) * self.scale
        return y


_LORA_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def add_lora(transformer: nn.Module, method: FEATMethod, rank: int) -> list[LoRALinear]:
    """Wrap the q/k/v projections of the FEAT layers (not the softmax ones) in :class:`LoRALinear` (idempotent)."""
    from ..install import installed_state

    state = installed_state(transformer)
    out = []
    for i, key in enumerate(state.keys):
        if i in method.config.softmax_layers:
            continue
        attn = transformer.get_submodule(key[: -len(".processor")])
        for name in _LORA_TARGETS:
            mod = getattr(attn, name, None)
            if isinstance(mod, LoRALinear):
                out.append(mod)
            elif isinstance(mod, nn.Linear):
                wrapped = LoRALinear(mod, rank)
                setattr(attn, name, wrapped)
                out.append(wrapped)
    return out


def remove_feat_lora(pipe_or_model: Any) -> int:
    """Unwrap every :class:`LoRALinear` of the transformer back to its frozen base projection (LoRA wrappers are
    module replacements, so ``remove_attention_acceleration`` alone leaves them). Returns how many were removed."""
    from ..install import resolve_transformer

    transformer, _ = resolve_transformer(pipe_or_model)
    n = 0
    for module in list(transformer.modules()):
        for name in _LORA_TARGETS:
            mod = getattr(module, name, None)
            if isinstance(mod, LoRALinear):
                setattr(module, name, mod.base)
                n += 1
    return n


def _set_lora(mods: list[LoRALinear], enabled: bool) -> None:
    for m in mods:
        m.enabled = enabled


# ---------------------------------------------------------------------- save / load
def save_feat_adapter(pipe_or_model: Any, path: str | os.PathLike) -> None:
    """Save the FEAT parameters (and LoRA weights, if any) plus the config to directory ``path``."""
    from safetensors.torch import save_file

    from ..install import installed_state, resolve_transformer

    transformer, _ = resolve_transformer(pipe_or_model)
    method = get_feat_method(transformer)
    tensors = {f"feat.{k}": v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    state = installed_state(transformer)
    for key in state.keys:
        prefix = key[: -len(".processor")]
        attn = transformer.get_submodule(prefix)
        for name in _LORA_TARGETS:
            mod = getattr(attn, name, None)
            if isinstance(mod, LoRALinear):
                tensors[f"lora.{prefix}.{name}.a"] = mod.lora_a.detach().cpu().contiguous()
                tensors[f"lora.{prefix}.{name}.b"] = mod.lora_b.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, _ADAPTER_FILE))
    meta = {"config": asdict(method.config), "layer_shapes": method.layer_shapes,
            "transformer": type(transformer).__name__}
    with open(os.path.join(path, _CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_feat_adapter(pipe_or_model: Any, path: str | os.PathLike) -> "AttentionContext":
    """Install FEAT with the saved config and load the saved parameters (and LoRA weights) into the model."""
    from safetensors.torch import load_file

    from ..install import installed_state, resolve_transformer

    transformer, _ = resolve_transformer(pipe_or_model)
    with open(os.path.join(path, _CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta["transformer"] != type(transformer).__name__:
        raise ValueError(f"adapter was saved for {meta['transformer']}, not {type(transformer).__name__}")
    ctx = apply_feat(transformer, FEATConfig(**meta["config"]))
    method = get_feat_method(transformer)
    if [list(s) for s in method.layer_shapes] != [list(s) for s in meta["layer_shapes"]]:
        raise ValueError(f"adapter layer shapes {meta['layer_shapes']} do not match the model {method.layer_shapes}")
    tensors = load_file(os.path.join(path, _ADAPTER_FILE))
    feat = {k[len("feat."):]: v for k, v in tensors.items() if k.startswith("feat.")}
    method.load_state_dict(feat)
    lora_keys = [k for k in tensors if k.startswith("lora.")]
    if lora_keys:
        rank = tensors[lora_keys[0]].shape[0] if lora_keys[0].endswith(".a") else tensors[lora_keys[0]].shape[1]
        add_lora(transformer, method, rank)
        state = installed_state(transformer)
        for key in state.keys:
            prefix = key[: -len(".processor")]
            attn = transformer.get_submodule(prefix)
            for name in _LORA_TARGETS:
                a = tensors.get(f"lora.{prefix}.{name}.a")
                mod = getattr(attn, name, None)
                if a is not None and isinstance(mod, LoRALinear):
                    with torch.no_grad():
                        mod.lora_a.copy_(a)
                        mod.lora_b.copy_(tensors[f"lora.{prefix}.{name}.b"])
    return ctx
