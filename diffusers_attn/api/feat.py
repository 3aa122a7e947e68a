"""``apply_feat``: install the FEAT method on a CogVideoX / HunyuanVideo / Open-Sora pipeline or transformer.

Training the new parameters (distillation, LoRA) and saving them live in :mod:`diffusers_attn.api.feat_training`.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..adapters import CogVideoXAttnProcessor, HunyuanVideoAttnProcessor, get_adapter
from ..adapters.processor import AcceleratedAttnProcessor
from ..context import AttentionContext
from ..install import install_method, installed_state, resolve_transformer
from ..methods.feat import FEATConfig, FEATLayer, FEATMethod

__all__ = [
    "FEATAttnProcessor",
    "FEATCogVideoXAttnProcessor",
    "FEATHunyuanVideoAttnProcessor",
    "apply_feat",
    "get_feat_method",
]


# ---------------------------------------------------------------------- processors
class FEATAttnProcessor:
    """Marker base of the FEAT processors (one subclass per model family). Build one with :meth:`for_transformer`
    or let :func:`apply_feat` install them; they compute q/k/v/out exactly as the stock processor.

    An experimental baseline: on the trained ``ref-cogvideox``, 200 distillation steps reach 18.4 dB PSNR against
    the stock output (a different seed of the stock model: 16.4 dB; half the layers on softmax: 20.2 dB), because
    its video x video weights ignore the query (mixing by position, not content). See
    :mod:`diffusers_attn.methods.feat.method`."""

    @staticmethod
    def for_transformer(transformer: nn.Module, method: FEATMethod, layer_index: int,
                        context: "AttentionContext | None" = None) -> "FEATAttnProcessor":
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
        if not (isinstance(base, type) and issubclass(base, AcceleratedAttnProcessor)):
            raise ValueError(f"FEAT cannot wrap {adapter.transformer_class_name}: its adapter has no method processor")
        cls = _PROCESSORS[adapter.name] = type(f"FEAT{base.__name__}", (FEATAttnProcessor, base), {})
    return cls


def _layer_shapes(transformer: nn.Module, keys: list[str]) -> list[tuple[int, int]]:
    shapes = []
    for key in keys:
        attn = transformer.get_submodule(key[: -len(".processor")])
        heads = attn.heads
        inner = attn.to_q.out_features if getattr(attn, "to_q", None) is not None else attn.inner_dim
        shapes.append((heads, inner // heads))
    return shapes


def apply_feat(pipe_or_model: Any, config: FEATConfig | None = None) -> AttentionContext:
    """Install the FEAT processor on a CogVideoX or HunyuanVideo pipeline (or bare transformer).

    The new parameters start untrained: the output is poor until :func:`distill_feat` (or a loaded adapter,
    :func:`load_feat_adapter`), and stays an experimental baseline after it (see :class:`FEATAttnProcessor`).
    Returns the transformer's :class:`AttentionContext`; the method is ``get_feat_method(pipe)``.
    """

    config = config if config is not None else FEATConfig()
    if not isinstance(config, FEATConfig):
        raise TypeError(f"config must be a FEATConfig, got {type(config).__name__}")
    transformer, _ = resolve_transformer(pipe_or_model)
    adapter = get_adapter(transformer)
    _processor_cls(adapter)  # an adapter without a method processor: say so before building anything
    keys = adapter.attention_layer_keys(dict(transformer.attn_processors), allow_replacing=(AcceleratedAttnProcessor,))
    shapes = _layer_shapes(transformer, keys)
    bad = [i for i in config.softmax_layers if i >= len(keys)]
    if bad:
        raise ValueError(f"softmax_layers {bad} out of range: the model has {len(keys)} attention layers")
    param = next(transformer.parameters())
    method = FEATMethod(config, shapes).to(param.device)
    return install_method(pipe_or_model, method, processor_cls=_processor_cls(adapter))


def get_feat_method(pipe_or_model: Any) -> FEATMethod:
    state = installed_state(pipe_or_model)
    if state is None or not isinstance(state.method, FEATMethod):
        raise ValueError("diffusers-attn: FEAT is not installed on this model (call apply_feat first)")
    return state.method


# ---------------------------------------------------------------------- distillation
