"""Convert the official Open-Sora 2.0 checkpoint (``Open_Sora_v2.safetensors``) to diffusers format.

The transform (spec ``opensora.md`` section 3.3) has four load-bearing steps besides the key renames:

* ``qk_permutation``: within each head, new channel 2j <- old j and 2j+1 <- old d/2+j on the output rows of every
  q and k projection (weight and bias). Rotate-half RoPE pairs (j, j+d/2); Flux's interleaved RoPE pairs
  (2j, 2j+1) with the same frequency, and attention logits are invariant under a permutation shared by q and k.
* ``norm_permutation``: the same permutation on the q/k RMSNorm scales (they act per channel before RoPE).
* ``single_split``: the fused single-block ``v_mlp`` rows split into ``attn.to_v`` and ``proj_mlp``.
* ``final_swap``: the final adaLN chunks (shift, scale) reordered to diffusers' (scale, shift).

Every source key must be consumed and every target shape must match the model built from the inferred config;
anything else raises with the offending keys named. Tensors are read, transformed and written one at a time
(safetensors), so an 11B checkpoint converts within a few GB of RAM.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

logger = logging.getLogger(__name__)

CONVERSION_STEPS = ("qk_permutation", "norm_permutation", "single_split", "final_swap")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class OpenSoraConversionError(ValueError):
    """The checkpoint does not have the Open-Sora 2.0 layout (message names the missing/unexpected keys)."""


@dataclass(frozen=True)
class _Target:
    key: str
    source: str
    op: str  # "copy" | "qk" | "norm" | "rows" | "swap"
    rows: tuple[int, int] | None = None


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Index ``idx`` with ``new = old[idx]`` per head: new 2j <- old j, new 2j+1 <- old head_dim/2 + j."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)


def _permute_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    idx = rope_permutation(head_dim)
    rows = t.shape[0]
    if rows % head_dim:
        raise OpenSoraConversionError(f"q/k tensor with {rows} rows is not a multiple of head_dim={head_dim}")
    shaped = t.reshape(rows // head_dim, head_dim, *t.shape[1:])
    return shaped[:, idx].reshape(t.shape).contiguous()


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def infer_config(shapes: dict[str, tuple[int, ...]], *, patch_size: int = 2, **overrides: Any) -> dict[str, Any]:
    """``OpenSoraTransformer3DModel`` config from the original checkpoint's key shapes (``overrides`` win)."""
    _check_layout(shapes)
    p2 = patch_size * patch_size
    hidden, in_packed = shapes["img_in.weight"]
    norm_key = next((k for k in shapes if k.endswith("query_norm.scale")), None)
    if norm_key is None:
        raise OpenSoraConversionError("no '*.norm.query_norm.scale' key: cannot determine the head dimension")
    head_dim = shapes[norm_key][0]
    if in_packed % p2 or hidden % head_dim:
        raise OpenSoraConversionError(
            f"img_in.weight {shapes['img_in.weight']} does not fit patch_size={patch_size}, head_dim={head_dim}"
        )
    mlp_hidden = shapes.get("double_blocks.0.img_mlp.0.weight", (4 * hidden,))[0]
    cfg = dict(
        in_channels=in_packed // p2,
        out_channels=shapes["final_layer.linear.weight"][0] // p2,
        patch_size=patch_size,
        num_layers=len(_indices(shapes, "double_blocks")),
        num_single_layers=len(_indices(shapes, "single_blocks")),
        num_attention_heads=hidden // head_dim,
        attention_head_dim=head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        axes_dims_rope=(16, 56, 56) if head_dim == 128 else None,
        rope_theta=10000,
        mlp_ratio=mlp_hidden / hidden,
        cond_embed="cond_in.weight" in shapes,
    )
    cfg.update(overrides)
    if cfg["axes_dims_rope"] is None:
        raise OpenSoraConversionError(
            f"head_dim={head_dim} differs from the release (128): pass axes_dims_rope=(t, h, w) explicitly"
        )
    cfg["axes_dims_rope"] = tuple(int(x) for x in cfg["axes_dims_rope"])
    return cfg


def _check_layout(shapes: dict[str, Any]) -> None:
    if any(k.startswith("guidance_in.") for k in shapes):
        raise OpenSoraConversionError(
            "checkpoint has a guidance embedding (guidance_in.*): that is a FLUX.1-dev-style model, not Open-Sora 2.0 "
            "(supported: Open_Sora_v2.safetensors, separate q/k/v, no guidance embedding)"
        )
    if any(k.endswith(("img_attn.qkv.weight", "single_blocks.0.linear1.weight")) for k in shapes):
        raise OpenSoraConversionError(
            "checkpoint has fused qkv/linear1 weights (fused_qkv=True); only the released fused_qkv=False layout "
            "(q_proj/k_proj/v_proj, v_mlp) is supported"
        )
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in shapes):
        raise OpenSoraConversionError(
            "checkpoint is already in diffusers layout (transformer_blocks.*): load it with "
            "OpenSoraTransformer3DModel.from_pretrained instead of converting"
        )
    for key in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"):
        if key not in shapes:
            sample = ", ".join(sorted(shapes)[:5])
            raise OpenSoraConversionError(
                f"not an Open-Sora 2.0 MMDiT checkpoint: key {key!r} is missing (first keys: {sample or 'none'})"
            )


def _plan(cfg: dict[str, Any], disabled: frozenset[str]) -> list[_Target]:
    """Target keys and how each is made from one source tensor."""
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    qk = "copy" if "qk_permutation" in disabled else "qk"
    nrm = "copy" if "norm_permutation" in disabled else "norm"
    plan: list[_Target] = []

    def lin(dst: str, src: str, op: str = "copy", rows=None) -> None:
        for s in ("weight", "bias"):
            plan.append(_Target(f"{dst}.{s}", f"{src}.{s}", op, rows))

    lin("x_embedder", "img_in")
    if cfg["cond_embed"]:
        lin("cond_embedder", "cond_in")
    lin("context_embedder", "txt_in")
    lin("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    lin("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    lin("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    lin("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    for i in range(cfg["num_layers"]):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        lin(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        lin(f"{d}.attn.to_q", f"{s}.img_attn.q_proj", qk)
        lin(f"{d}.attn.to_k", f"{s}.img_attn.k_proj", qk)
        lin(f"{d}.attn.to_v", f"{s}.img_attn.v_proj")
        lin(f"{d}.attn.add_q_proj", f"{s}.txt_attn.q_proj", qk)
        lin(f"{d}.attn.add_k_proj", f"{s}.txt_attn.k_proj", qk)
        lin(f"{d}.attn.add_v_proj", f"{s}.txt_attn.v_proj")
        plan.append(_Target(f"{d}.attn.norm_q.weight", f"{s}.img_attn.norm.query_norm.scale", nrm))
        plan.append(_Target(f"{d}.attn.norm_k.weight", f"{s}.img_attn.norm.key_norm.scale", nrm))
        plan.append(_Target(f"{d}.attn.norm_added_q.weight", f"{s}.txt_attn.norm.query_norm.scale", nrm))
        plan.append(_Target(f"{d}.attn.norm_added_k.weight", f"{s}.txt_attn.norm.key_norm.scale", nrm))
        lin(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        lin(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
        lin(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        lin(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        lin(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        lin(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
    for i in range(cfg["num_single_layers"]):
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lin(f"{d}.attn.to_q", f"{s}.q_proj", qk)
        lin(f"{d}.attn.to_k", f"{s}.k_proj", qk)
        if "single_split" in disabled:
            lin(f"{d}.attn.to_v", f"{s}.v_mlp")  # ablation: fused tensor where the value projection belongs
        else:
            lin(f"{d}.attn.to_v", f"{s}.v_mlp", "rows", (0, hidden))
            lin(f"{d}.proj_mlp", f"{s}.v_mlp", "rows", (hidden, None))
        plan.append(_Target(f"{d}.attn.norm_q.weight", f"{s}.norm.query_norm.scale", nrm))
        plan.append(_Target(f"{d}.attn.norm_k.weight", f"{s}.norm.key_norm.scale", nrm))
        lin(f"{d}.proj_out", f"{s}.linear2")
        lin(f"{d}.norm.linear", f"{s}.modulation.lin")
    lin("norm_out.linear", "final_layer.adaLN_modulation.1", "copy" if "final_swap" in disabled else "swap")
    lin("proj_out", "final_layer.linear")
    return plan


def _apply(t: torch.Tensor, target: _Target, head_dim: int) -> torch.Tensor:
    if target.op in ("qk", "norm"):
        return _permute_heads(t, head_dim)
    if target.op == "rows":
        lo, hi = target.rows
        return t[lo:hi].contiguous()
    if target.op == "swap":
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    return t


def _target_shape(shape: tuple[int, ...], target: _Target) -> tuple[int, ...]:
    if target.op == "rows":
        lo, hi = target.rows
        hi = shape[0] if hi is None else hi
        return (hi - lo, *shape[1:])
    return tuple(shape)


def _validate(plan: list[_Target], shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any]) -> None:
    """Every source key consumed, no source key missing, target keys/shapes equal to the model's."""
    from .transformer import OpenSoraTransformer3DModel

    needed = {t.source for t in plan}
    missing = sorted(needed - set(shapes))
    unexpected = sorted(set(shapes) - needed)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if problems:
        raise OpenSoraConversionError("Open-Sora 2.0 checkpoint does not match the expected layout: " + "; ".join(problems))
    with torch.device("meta"):
        model = OpenSoraTransformer3DModel(**cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {t.key: _target_shape(shapes[t.source], t) for t in plan}
    bad = [f"{k}: {got[k]} vs model {expected[k]}" for k in got if k in expected and got[k] != expected[k]]
    absent = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if bad or absent or extra:
        parts = []
        if bad:
            parts.append(f"shape mismatch {'; '.join(bad[:6])}")
        if absent:
            parts.append(f"model keys not produced: {', '.join(absent[:6])}")
        if extra:
            parts.append(f"produced keys the model lacks: {', '.join(extra[:6])}")
        raise OpenSoraConversionError("converted weights do not fit OpenSoraTransformer3DModel: " + "; ".join(parts))


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
        from safetensors import SafetensorError, safe_open

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


def _prepare(checkpoint, config_overrides, disable_steps) -> tuple[_Source, dict[str, Any], list[_Target]]:
    disabled = frozenset(disable_steps or ())
    unknown = disabled - set(CONVERSION_STEPS)
    if unknown:
        raise ValueError(f"unknown conversion steps {sorted(unknown)}; known: {CONVERSION_STEPS}")
    if disabled:
        logger.warning("Open-Sora conversion with steps disabled %s: the result is NOT the original model", sorted(disabled))
    src = _Source(checkpoint)
    cfg = infer_config(src.shapes, **(config_overrides or {}))
    plan = _plan(cfg, disabled)
    _validate(plan, src.shapes, cfg)
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
            t = _apply(src.get(target.source), target, head_dim)
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
    from .transformer import OpenSoraTransformer3DModel

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
    from safetensors.torch import save_file

    src, cfg, plan = _prepare(checkpoint, config_overrides, ())
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    # Assign shards from header sizes so file names are known before reading any tensor.
    shards: list[list[_Target]] = [[]]
    size = 0
    for t in plan:
        n = _numel(_target_shape(src.shapes[t.source], t))
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
            x = _apply(src.get(t.source), t, head_dim)
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
    import diffusers

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
    from diffusers import AutoencoderKLHunyuanVideo
    from safetensors.torch import load_file

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
    from diffusers import FlowMatchEulerDiscreteScheduler

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
    import diffusers

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
