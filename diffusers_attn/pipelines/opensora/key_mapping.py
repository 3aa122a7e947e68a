"""Open-Sora 2.0 -> diffusers key mapping: which original tensor each ``OpenSoraTransformer3DModel`` weight is made
from, and how. Besides the key renames the transform has four load-bearing steps:

* ``qk_permutation``: within each head, new channel 2j <- old j and 2j+1 <- old d/2+j on the output rows of every
  q and k projection (weight and bias). Rotate-half RoPE pairs (j, j+d/2); Flux's interleaved RoPE pairs
  (2j, 2j+1) with the same frequency, and attention logits are invariant under a permutation shared by q and k.
* ``norm_permutation``: the same permutation on the q/k RMSNorm scales (they act per channel before RoPE).
* ``single_split``: the fused single-block ``v_mlp`` rows split into ``attn.to_v`` and ``proj_mlp``.
* ``final_swap``: the final adaLN chunks (shift, scale) reordered to diffusers' (scale, shift).

The original layout is that of the released ``Open_Sora_v2.safetensors`` (https://github.com/hpcaitech/Open-Sora,
``opensora/models/mmdit``). Every source key must be consumed and every target shape must match the model built
from the inferred config; anything else raises with the offending keys named. Reading and writing the tensors is
:mod:`.convert`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .transformer import OpenSoraTransformer3DModel

CONVERSION_STEPS = ("qk_permutation", "norm_permutation", "single_split", "final_swap")


class OpenSoraConversionError(ValueError):
    """The checkpoint does not have the Open-Sora 2.0 layout (message names the missing/unexpected keys)."""


@dataclass(frozen=True)
class Target:
    """One converted tensor: target key, the source key it is made from, and how (``op``)."""

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


def conversion_plan(cfg: dict[str, Any], disabled: frozenset[str]) -> list[Target]:
    """Target keys and how each is made from one source tensor."""
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    qk = "copy" if "qk_permutation" in disabled else "qk"
    nrm = "copy" if "norm_permutation" in disabled else "norm"
    plan: list[Target] = []

    def lin(dst: str, src: str, op: str = "copy", rows=None) -> None:
        for s in ("weight", "bias"):
            plan.append(Target(f"{dst}.{s}", f"{src}.{s}", op, rows))

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
        plan.append(Target(f"{d}.attn.norm_q.weight", f"{s}.img_attn.norm.query_norm.scale", nrm))
        plan.append(Target(f"{d}.attn.norm_k.weight", f"{s}.img_attn.norm.key_norm.scale", nrm))
        plan.append(Target(f"{d}.attn.norm_added_q.weight", f"{s}.txt_attn.norm.query_norm.scale", nrm))
        plan.append(Target(f"{d}.attn.norm_added_k.weight", f"{s}.txt_attn.norm.key_norm.scale", nrm))
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
        plan.append(Target(f"{d}.attn.norm_q.weight", f"{s}.norm.query_norm.scale", nrm))
        plan.append(Target(f"{d}.attn.norm_k.weight", f"{s}.norm.key_norm.scale", nrm))
        lin(f"{d}.proj_out", f"{s}.linear2")
        lin(f"{d}.norm.linear", f"{s}.modulation.lin")
    lin("norm_out.linear", "final_layer.adaLN_modulation.1", "copy" if "final_swap" in disabled else "swap")
    lin("proj_out", "final_layer.linear")
    return plan


def apply_target(t: torch.Tensor, target: Target, head_dim: int) -> torch.Tensor:
    if target.op in ("qk", "norm"):
        return _permute_heads(t, head_dim)
    if target.op == "rows":
        lo, hi = target.rows
        return t[lo:hi].contiguous()
    if target.op == "swap":
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    return t


def target_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    if target.op == "rows":
        lo, hi = target.rows
        hi = shape[0] if hi is None else hi
        return (hi - lo, *shape[1:])
    return tuple(shape)


def validate_plan(plan: list[Target], shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any]) -> None:
    """Every source key consumed, no source key missing, target keys/shapes equal to the model's."""
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
    got = {t.key: target_shape(shapes[t.source], t) for t in plan}
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
