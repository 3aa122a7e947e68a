"""Training and storing FEAT's new parameters: layer-wise distillation against the stock attention, optional
LoRA on the projections, save / load of the adapter."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from ..context import AttentionContext
from ..install import installed_state, resolve_transformer
from ..methods.feat import FEATConfig, FEATMethod
from .feat import apply_feat, get_feat_method

logger = logging.getLogger(__name__)

_ADAPTER_FILE = "feat_adapter.safetensors"
_CONFIG_FILE = "feat_adapter.json"

def collect_transformer_inputs(pipe: Any, **pipeline_kwargs: Any) -> list[dict[str, Any]]:
    """Run ``pipe(**pipeline_kwargs)`` with the *stock* attention and return every transformer call's keyword
    inputs (detached, on their device): hidden states along the teacher's own sampling trajectory."""
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


def load_feat_adapter(pipe_or_model: Any, path: str | os.PathLike) -> AttentionContext:
    """Install FEAT with the saved config and load the saved parameters (and LoRA weights) into the model."""
    from safetensors.torch import load_file

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

