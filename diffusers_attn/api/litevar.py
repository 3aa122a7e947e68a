"""``apply_litevar`` / ``calibrate_litevar``: LiteVAR on a VAR pipeline, through the one install path."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from ..adapters.var import VARProbeAttnProcessor
from ..context import AttentionContext, get_attention_context
from ..install import install_method, installed_state, remove_attention_acceleration
from ..methods.litevar import (
    DEFAULT_PATCH_NUMS,
    LITEVAR_CANDIDATE_WIDTHS,
    LITEVAR_DROP_TABLE,
    MASK_FORMAT_VERSION,
    LiteVARConfig,
    LiteVARMaskSet,
    LiteVARMethod,
    choose_widths,
    default_maskable,
    litevar_calibration_labels,
)
from ..methods.litevar.calibration import Recorder as _Recorder
from ..methods.litevar.quant import apply_int8
from ..pipelines.var.transformer import VARTransformer


def _resolve(pipe_or_model: Any) -> tuple[Any, Any]:
    tr = getattr(pipe_or_model, "transformer", pipe_or_model)
    if not isinstance(tr, VARTransformer):
        raise TypeError(f"LiteVAR works on a VARPipeline or VARTransformer, got {type(pipe_or_model).__name__}")
    return tr, pipe_or_model if tr is not pipe_or_model else None


def apply_litevar(pipe_or_model: Any, config: LiteVARConfig | None = None) -> AttentionContext:
    """Install LiteVAR on a :class:`~diffusers_attn.VARPipeline` (or its transformer). Re-applying replaces it;
    :func:`~diffusers_attn.remove_attention_acceleration` removes it (and un-wraps quantized linears).

    Example::

        masks = calibrate_litevar(pipe, class_labels=range(0, 1000, 50))
        apply_litevar(pipe, LiteVARConfig(masks=masks, share_cfg_attention=True, quant="w8a8"))
        images = pipe(class_labels=[207, 360]).images
        print(get_attention_stats(pipe))
        remove_attention_acceleration(pipe)
    """
    config = config if config is not None else LiteVARConfig()
    if not isinstance(config, LiteVARConfig):
        raise TypeError(f"config must be a LiteVARConfig, got {type(config).__name__}")
    tr, _ = _resolve(pipe_or_model)
    if config.masks is not None:
        config.masks.check_model(tr)  # before anything is replaced
    if config.quant == "int8" and tr.device.type != "cuda":
        apply_int8(tr, config.quant_exclude)  # raises the clear CPU error before anything is installed
    return install_method(pipe_or_model, LiteVARMethod(config))


def remove_litevar(pipe_or_model: Any) -> bool:
    """Remove LiteVAR (same as :func:`~diffusers_attn.remove_attention_acceleration`). False if it was not
    installed."""
    tr, _ = _resolve(pipe_or_model)
    state = installed_state(tr)
    if state is None or not isinstance(state.method, LiteVARMethod):
        return False
    return remove_attention_acceleration(tr)


def begin_var_generation(transformer: Any) -> None:
    """Start a new generation in the stats by hand (the processors do it themselves at scale 0; this is for
    callers that run only later scales, e.g. teacher-forced evaluation)."""
    ctx = get_attention_context(transformer)
    if ctx is not None:
        ctx.begin_generation()


def _calibration_tables(tr: Any, patch_nums: tuple[int, ...], layout: dict[int, tuple[int, ...]],
                        drop_table: Any, candidate_widths: Any) -> tuple[Any, Any, Any]:
    """``(drop table, per-scale candidate table, candidate list)`` from the options, validated for this model."""
    if drop_table == "litevar":
        if patch_nums != DEFAULT_PATCH_NUMS or layout != default_maskable(patch_nums):
            raise ValueError(
                f"drop_table='litevar' is defined for patch_nums {DEFAULT_PATCH_NUMS} with LiteVAR's segment layout; "
                f"this model has {patch_nums}: pass drop_table=None or a dict {{scale: thresholds per segment}}"
            )
        table: Mapping[int, Sequence[float]] | None = LITEVAR_DROP_TABLE
    elif drop_table is None or isinstance(drop_table, Mapping):
        table = drop_table
    else:
        raise ValueError(f"drop_table {drop_table!r}: use 'litevar', None or a dict")
    if table is not None:
        for k_, segs in layout.items():
            if k_ in table and len(table[k_]) != len(segs):
                raise ValueError(f"drop_table[{k_}] has {len(table[k_])} thresholds for {len(segs)} segments")
    cand_table: dict[int, Any] | None = None
    if candidate_widths == "all":
        cands = None
    elif candidate_widths == "litevar":
        if (tr.num_heads not in LITEVAR_CANDIDATE_WIDTHS or patch_nums != DEFAULT_PATCH_NUMS
                or layout != default_maskable(patch_nums)):
            raise ValueError(
                "candidate_widths='litevar' exists only for the release's 16- and 30-head models (d16, d30) with "
                f"patch_nums {DEFAULT_PATCH_NUMS}; this model has {tr.num_heads} heads: use 'all' or a list of ints"
            )
        cands = None
        cand_table = LITEVAR_CANDIDATE_WIDTHS[tr.num_heads]
    elif isinstance(candidate_widths, str):
        raise ValueError(f"candidate_widths {candidate_widths!r}: use 'all', 'litevar' or a list of ints")
    else:
        cands = [int(c) for c in candidate_widths]
    return table, cand_table, cands


@torch.no_grad()
def calibrate_litevar(
    pipe: Any,
    class_labels: Iterable[int] | None = None,
    *,
    threshold: float = 0.95,
    prob_floor: float = 0.003,
    drop_table: str | Mapping[int, Sequence[float]] | None = "litevar",
    candidate_widths: str | Sequence[int] = "all",  # "all", "litevar" (d16/d30 lists) or a list
    maskable: Mapping[int, Sequence[int]] | None = None,
    batch_size: int = 8,
    guidance_scale: float = 4.0,
    top_k: int = 900,
    top_p: float = 0.95,
    seed: int = 0,
) -> LiteVARMaskSet:
    """Calibrate MDWA masks offline on full-attention maps of ``pipe`` sampling ``class_labels``.

    Per batch (CFG batch of 2 x ``batch_size``), scale, block, head and maskable segment: probabilities below
    ``prob_floor`` are zeroed; the segment is DROPped when its share of the head's mass is below ``drop_table``
    (``"litevar"``: the release's table, 10-scale models only; None: never drop); otherwise it gets the smallest
    candidate width whose band keeps ``threshold`` of the segment's mass (``candidate_widths="all"``: 1 ... n_seg;
    ``"litevar"``: the release's hand-picked d16/d30 lists), FULL if none does. Batches merge by **union** (max
    width; our documented choice, the release's merge rule is not published). ``class_labels`` default:
    LiteVAR's calibration set (160 classes).
    """
    tr, owner = _resolve(pipe)
    if owner is None:
        raise TypeError("calibrate_litevar samples images: pass the VARPipeline, not its transformer")
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    labels = list(class_labels) if class_labels is not None else litevar_calibration_labels()
    if not labels:
        raise ValueError("class_labels is empty")
    patch_nums = tuple(tr.patch_nums)
    layout = dict(maskable) if maskable is not None else default_maskable(patch_nums)
    table, cand_table, cands = _calibration_tables(tr, patch_nums, layout, drop_table, candidate_widths)
    if installed_state(tr) is not None:
        raise RuntimeError("calibrate on the dense model: call remove_attention_acceleration(pipe) first")
    rec = _Recorder(patch_nums, layout, prob_floor)
    originals = dict(tr.attn_processors)
    tr.set_attn_processor({key: VARProbeAttnProcessor(int(key.split(".")[1]), rec.maskable, rec.add)
                           for key in originals})
    merged: LiteVARMaskSet | None = None
    depth, H = len(tr.blocks), tr.num_heads
    try:
        for start in range(0, len(labels), batch_size):
            rec.reset()
            gen = torch.Generator(tr.device).manual_seed(seed)
            pipe(class_labels=labels[start : start + batch_size], guidance_scale=guidance_scale, top_k=top_k,
                 top_p=top_p, generator=gen, output_type="latent")
            widths = {}
            for k_, segs in layout.items():
                w = torch.zeros(depth, H, len(segs), dtype=torch.int16)
                for b in range(depth):
                    hist, seg_mass, total = rec.data[(k_, b)]
                    w[b] = choose_widths(hist, seg_mass, total, k_, segs, patch_nums, threshold,
                                         None if table is None else table.get(k_),
                                         drop_table == "litevar" and k_ == len(patch_nums) - 1,
                                         cand_table[k_] if cand_table is not None else cands)
                widths[k_] = w
            ms = LiteVARMaskSet(patch_nums, depth, H, widths, layout)
            merged = ms if merged is None else merged.union(ms)
    finally:
        tr.set_attn_processor(dict(originals))
    merged.metadata = {
        "threshold": threshold, "prob_floor": prob_floor,
        "drop_table": (drop_table if isinstance(drop_table, str) or drop_table is None
                       else {str(a): list(b) for a, b in drop_table.items()}),
        "candidate_widths": candidate_widths if isinstance(candidate_widths, str) else list(cands),
        "class_labels": labels, "batch_size": batch_size, "seed": seed, "guidance_scale": guidance_scale,
        "top_k": top_k, "top_p": top_p, "merge": "union", "version": MASK_FORMAT_VERSION,
    }
    return merged
