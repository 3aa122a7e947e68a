"""Convert the official Open-Sora 2.0 checkpoint (``Open_Sora_v2.safetensors``) to diffusers format.

What each converted tensor is made from is in :mod:`.key_mapping`; this module reads the checkpoint (safetensors,
lazily) and writes the results. Tensors are read, transformed and written one at a time, so an 11B checkpoint
converts within a few GB of RAM.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import diffusers
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .key_mapping import (
    CONVERSION_STEPS,
    OpenSoraConversionError,
    Target,
    apply_target,
    conversion_plan,
    infer_config,
    rope_permutation,
    target_shape,
    validate_plan,
)
from .transformer import OpenSoraTransformer3DModel

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class _Source:
    """Read access to a checkpoint: a safetensors path (lazy, tensor by tensor) or an in-memory state dict."""

    def __init__(self, checkpoint: str | os.PathLike | dict[str, torch.Tensor]):
        self._handle = None
        if isinstance(checkpoint, dict):
            self._sd = checkpoint
            self.shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
            self.nbytes = {k: v.numel() * v.element_size() for k, v in checkpoint.items()}
            return
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"Open-Sora checkpoint not found: {path}")
        try:
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise OpenSoraConversionError(
                f"{path} is not a readable safetensors file ({e}); expected the official Open_Sora_v2.safetensors"
            ) from None
        self._sd = None
        self.shapes, self.nbytes = {}, {}
        for k in self._handle.keys():
            sl = self._handle.get_slice(k)
            shape = tuple(sl.get_shape())
            self.shapes[k] = shape
            n = 1
            for d in shape:
                n *= d
            self.nbytes[k] = n * _DTYPE_BYTES.get(sl.get_dtype(), 4)

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key] if self._sd is not None else self._handle.get_tensor(key)


def _prepare(checkpoint, config_overrides, disable_steps) -> tuple[_Source, dict[str, Any], list[Target]]:
    disabled = frozenset(disable_steps or ())
    unknown = disabled - set(CONVERSION_STEPS)
    if unknown:
        raise ValueError(f"unknown conversion steps {sorted(unknown)}; known: {CONVERSION_STEPS}")
    if disabled:
        logger.warning("Open-Sora conversion with steps disabled %s: the result is NOT the original model", sorted(disabled))
    src = _Source(checkpoint)
    cfg = infer_config(src.shapes, **(config_overrides or {}))
    plan = conversion_plan(cfg, disabled)
    validate_plan(plan, src.shapes, cfg)
    return src, cfg, plan


def iter_converted_tensors(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    config_overrides: dict[str, Any] | None = None,
    disable_steps: Iterable[str] = (),
) -> tuple[dict[str, Any], Callable[[], Iterable[tuple[str, torch.Tensor]]]]:
    """``(config, iterator factory)``: the model config and a generator of converted ``(key, tensor)`` pairs.

    The layout is validated before any tensor is read. ``disable_steps`` (a subset of :data:`CONVERSION_STEPS`)
    exists for ablation tests only.
    """
    src, cfg, plan = _prepare(checkpoint, config_overrides, disable_steps)
    head_dim = cfg["attention_head_dim"]

    def gen():
        for target in plan:
            t = apply_target(src.get(target.source), target, head_dim)
            yield target.key, (t.to(dtype) if dtype is not None else t)

    return cfg, gen


def convert_opensora_state_dict(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    config_overrides: dict[str, Any] | None = None,
    disable_steps: Iterable[str] = (),
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, diffusers state dict)`` in memory (see :func:`convert_opensora_checkpoint` for disk)."""
    cfg, gen = iter_converted_tensors(
        checkpoint, dtype=dtype, config_overrides=config_overrides, disable_steps=disable_steps
    )
    return cfg, dict(gen())


def transformer_from_original(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    *,
    torch_dtype: torch.dtype | None = None,
    config_overrides: dict[str, Any] | None = None,
    disable_steps: Iterable[str] = (),
):
    """Build an :class:`OpenSoraTransformer3DModel` directly from the original checkpoint (no copy on disk).

    The model is created on the meta device and takes the converted tensors by assignment, so peak memory is one
    copy of the weights."""
    cfg, sd = convert_opensora_state_dict(
        checkpoint, dtype=torch_dtype, config_overrides=config_overrides, disable_steps=disable_steps
    )
    with torch.device("meta"):
        model = OpenSoraTransformer3DModel(**cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size must be an int or like '5GB', got {size!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)])


def convert_opensora_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the converted transformer as a diffusers model folder (``config.json`` + sharded safetensors).

    Streams one tensor at a time: peak memory is about one shard. Returns ``output_dir``.
    """
    src, cfg, plan = _prepare(checkpoint, config_overrides, ())
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    # Assign shards from header sizes so file names are known before reading any tensor.
    shards: list[list[Target]] = [[]]
    size = 0
    for t in plan:
        n = _numel(target_shape(src.shapes[t.source], t))
        elem = (torch.empty((), dtype=dtype).element_size() if dtype is not None
                else src.nbytes[t.source] // max(1, _numel(src.shapes[t.source])))
        nbytes = n * elem
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    head_dim = cfg["attention_head_dim"]
    names = (
        ["diffusion_pytorch_model.safetensors"]
        if len(shards) == 1
        else [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for t in shard:
            x = apply_target(src.get(t.source), t, head_dim)
            x = x.to(dtype) if dtype is not None else x
            tensors[t.key] = x.contiguous()
            total += x.numel() * x.element_size()
            weight_map[t.key] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(cfg, _class_name="OpenSoraTransformer3DModel", axes_dims_rope=list(cfg["axes_dims_rope"]))
    config["_diffusers_version"] = diffusers.__version__
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    logger.info("wrote %d tensors (%.2f GB) in %d shard(s) to %s", len(weight_map), total / 1e9, len(shards), out)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def convert_hunyuan_vae(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    vae_config: dict[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Load Open-Sora's ``hunyuan_vae.safetensors`` strictly into ``AutoencoderKLHunyuanVideo`` (default config =
    the HunyuanVideo VAE); save it to ``output_dir`` when given. Missing/unexpected keys raise, naming them."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises several types for non-safetensors input
        raise OpenSoraConversionError(f"{path} is not a readable safetensors file ({e})") from None
    vae = AutoencoderKLHunyuanVideo(**(vae_config or {}))
    model_keys = set(vae.state_dict())
    missing, unexpected = sorted(model_keys - set(sd)), sorted(set(sd) - model_keys)
    if missing or unexpected:
        raise OpenSoraConversionError(
            f"{path} does not load strictly into AutoencoderKLHunyuanVideo: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    vae.load_state_dict(sd, strict=True)
    if torch_dtype is not None:
        vae = vae.to(torch_dtype)
    if output_dir is not None:
        vae.save_pretrained(str(output_dir))
    return vae


def scheduler_for_opensora():
    """``FlowMatchEulerDiscreteScheduler`` configured for Open-Sora's resolution/frame-dependent linear shift."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")


def convert_opensora_v2_to_diffusers(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    vae: str | os.PathLike | None = None,
    t5: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    config_overrides: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
) -> Path:
    """Write a diffusers pipeline folder for :class:`OpenSoraPipeline`: ``transformer/``, ``scheduler/``, and
    ``vae/`` / ``text_encoder`` + ``tokenizer`` (T5) / ``text_encoder_2`` + ``tokenizer_2`` (CLIP) when given.

    ``t5`` and ``clip`` are local folders or hub ids of ``google/t5-v1_1-xxl`` / ``openai/clip-vit-large-patch14``
    (the Open-Sora-v2 repository ships copies). Components not given are recorded as absent in
    ``model_index.json``; pass them to ``OpenSoraPipeline.from_pretrained(..., vae=...)`` later.
    """
    out = Path(output_dir)
    _prepare(checkpoint, config_overrides, ())  # validate the layout before creating anything
    out.mkdir(parents=True, exist_ok=True)
    convert_opensora_checkpoint(checkpoint, out / "transformer", dtype=dtype, max_shard_size=max_shard_size,
                                config_overrides=config_overrides)
    scheduler_for_opensora().save_pretrained(str(out / "scheduler"))
    index: dict[str, Any] = {
        "_class_name": "OpenSoraPipeline",
        "_diffusers_version": diffusers.__version__,
        # the defining module (it imports ModelMixin, which diffusers needs to find the loading method), as
        # save_pretrained writes it
        "transformer": ["diffusers_attn.pipelines.opensora.transformer", "OpenSoraTransformer3DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": [None, None],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "text_encoder_2": [None, None],
        "tokenizer_2": [None, None],
    }
    if vae is not None:
        convert_hunyuan_vae(vae, out / "vae", vae_config=vae_config, torch_dtype=dtype)
        index["vae"] = ["diffusers", "AutoencoderKLHunyuanVideo"]
    if t5 is not None:
        from transformers import AutoTokenizer, T5EncoderModel

        tok = AutoTokenizer.from_pretrained(str(t5))
        tok.save_pretrained(str(out / "tokenizer"))
        T5EncoderModel.from_pretrained(str(t5), torch_dtype=dtype).save_pretrained(str(out / "text_encoder"))
        index["tokenizer"] = ["transformers", type(tok).__name__]
        index["text_encoder"] = ["transformers", "T5EncoderModel"]
    if clip is not None:
        from transformers import AutoTokenizer, CLIPTextModel

        tok = AutoTokenizer.from_pretrained(str(clip))
        tok.save_pretrained(str(out / "tokenizer_2"))
        CLIPTextModel.from_pretrained(str(clip), torch_dtype=dtype).save_pretrained(str(out / "text_encoder_2"))
        index["tokenizer_2"] = ["transformers", type(tok).__name__]
        index["text_encoder_2"] = ["transformers", "CLIPTextModel"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


__all__ = [
    "CONVERSION_STEPS",
    "OpenSoraConversionError",
    "convert_hunyuan_vae",
    "convert_opensora_checkpoint",
    "convert_opensora_state_dict",
    "convert_opensora_v2_to_diffusers",
    "infer_config",
    "iter_converted_tensors",
    "rope_permutation",
    "scheduler_for_opensora",
    "transformer_from_original",
]
