"""The demo's built-in methods: RainFusion, LiteVAR and FEAT (registered by :func:`register_builtin_methods`).

* **RainFusion** picks a per-head Spatial / Temporal / Textural block-sparse pattern online (ARM).
* **LiteVAR** runs on VAR (class labels instead of a prompt, images instead of videos). Its masks are calibrated
  once per loaded model and mask threshold on a few class labels (cached with the model); the figure shows the
  kept attention share per block and scale.
* **FEAT** replaces video x video softmax attention by linear attention whose new parameters must be distilled:
  the demo runs a short distillation on transformer inputs collected from the same prompt and seed before the
  accelerated run, and reports the per-layer error before / after (``method_report``) with a per-layer figure.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from .._defaults import DEFAULT_MODE, DEFAULT_SPARSITY, RAINFUSION_MODES, SMALL_GRID
from ..adapters import get_adapter
from ..compare import LoadedPipeline, load_var_pipeline
from ..pipelines.tiny import TINY_MODELS, TINY_VAR_MODELS
from ..pipelines.var import VARPipeline
from ..reference_models import REFERENCE_MODELS
from ..reference_models.var import REFERENCE_VAR_MODELS
from .methods import ApplyCall, DemoInputError, DemoMethod, Knob, register_method

# ------------------------------------------------------------------------------------------------ RainFusion


def _rainfusion_config(knobs: dict[str, Any], loaded: LoadedPipeline):
    from ..methods.rainfusion import RainFusionConfig

    # Same rule as `diffusers-attn compare`: the built-in models' small grids get SMALL_GRID, others the defaults.
    return RainFusionConfig(
        sparsity=knobs["sparsity"],
        mode=knobs.get("mode", DEFAULT_MODE),
        dense_steps=knobs["dense_steps"],
        dense_layers=knobs["dense_layers"],
        arm_threshold=knobs["arm_threshold"],
        arm_rule=knobs["arm_rule"],
        **(SMALL_GRID if loaded.tiny else {}),
    )


def _rainfusion_apply(knobs: dict[str, Any], loaded: LoadedPipeline) -> Callable[[Any], None]:
    from ..api import apply_rainfusion

    config = _rainfusion_config(knobs, loaded)
    return lambda pipe: apply_rainfusion(pipe, config)


def _rainfusion_describe(knobs: dict[str, Any], loaded: LoadedPipeline) -> dict[str, Any]:
    return dataclasses.asdict(_rainfusion_config(knobs, loaded))


def rainfusion_method() -> DemoMethod:
    return DemoMethod(
        key="rainfusion",
        label="RainFusion (sparse attention)",
        knobs=(
            Knob("sparsity", "Sparsity", "float", DEFAULT_SPARSITY, 0.0, 0.95, 0.01,
                 info="share of video x video pairs skipped (0 = stock attention)"),
            Knob("mode", "Mode", "choice", DEFAULT_MODE, choices=RAINFUSION_MODES,
                 info="rf1: per-head Spatial/Temporal/Textural patterns (ARM); rf2: RainFusion 2.0 block top-k"),
            Knob("dense_steps", "Dense warm-up (fraction of steps)", "float", 0.25, 0.0, 1.0, 0.05),
            Knob("dense_layers", "Dense first layers", "int", 1, 0, 8, 1),
            Knob("arm_threshold", "ARM threshold", "float", 0.9, 0.0, 1.0, 0.05,
                 info="rf1: a head goes sparse only with a pattern that keeps this share of the sampled mass; else dense"),
            Knob("arm_rule", "ARM rule", "choice", "cheapest", choices=("cheapest", "argmax"),
                 info="cheapest: the least-computing pattern that reaches the threshold; argmax: the highest recall"),
        ),
        make_apply=_rainfusion_apply,
        describe=_rainfusion_describe,
        models=(*REFERENCE_MODELS, *TINY_MODELS),  # trained reference models first: they show real motion
        description="rf1: per-head Spatial / Temporal / Textural block-sparse patterns chosen online (ARM); "
        "rf2: RainFusion 2.0, the top key blocks of every query block up to the budget.",
    )


# ------------------------------------------------------------------------------------------------ LiteVAR

_INT8_REASON = ("the real int8 path (torch._int_mm) needs a CUDA device; on CPU use a fake-quant preset "
                "(w8a8, w6a6, w4a8, w4a6, w4a4, w8a8_fp16attn) for accuracy studies")


def _quant_choices() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    from ..methods.litevar.quant import QUANT_PRESETS

    presets = ("none", *QUANT_PRESETS)
    if torch.cuda.is_available():
        return (*presets, "int8"), ()
    return presets, (("int8", _INT8_REASON),)


def calibration_labels(num_classes: int, n: int = 8) -> list[int]:
    """``n`` class labels spread evenly over the classes (LiteVAR's full set has 160; the demo uses a few)."""
    return sorted({i * num_classes // n for i in range(n)})


def litevar_masks(loaded: LoadedPipeline, threshold: float,
                  progress: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Calibrated MDWA masks of ``loaded`` at ``threshold``: computed on the first request, then cached with the
    loaded model. Returns (mask set, what was done)."""
    from ..api.litevar import calibrate_litevar
    from ..methods.litevar import DEFAULT_PATCH_NUMS, default_maskable

    key = f"litevar_masks@{threshold:.4f}"
    tr = loaded.pipe.transformer
    labels = calibration_labels(int(tr.config.num_classes))
    patch_nums = tuple(tr.patch_nums)
    # LiteVAR's drop table exists for the released 10-scale layout only; other layouts keep every segment.
    drop = "litevar" if patch_nums == DEFAULT_PATCH_NUMS else None
    info = {"threshold": threshold, "calibration_labels": labels, "drop_table": drop,
            "maskable_scales": sorted(default_maskable(patch_nums))}
    if key in loaded.cache:
        return loaded.cache[key], {**info, "cached": True, "seconds": 0.0}
    if progress is not None:
        progress(f"calibrating LiteVAR masks on {len(labels)} class labels (once per model)")
    t0 = time.perf_counter()
    d = loaded.defaults
    masks = calibrate_litevar(loaded.pipe, labels, threshold=threshold, drop_table=drop, batch_size=4,
                              guidance_scale=d.get("guidance_scale", 4.0), top_k=d.get("top_k", 900),
                              top_p=d.get("top_p", 0.95))
    loaded.cache[key] = masks
    return masks, {**info, "cached": False, "seconds": round(time.perf_counter() - t0, 3)}


def _litevar_check(knobs: dict[str, Any], loaded: LoadedPipeline) -> None:
    if not isinstance(loaded.pipe, VARPipeline):
        raise DemoInputError(f"LiteVAR runs on VAR models (e.g. tiny-var); {loaded.name!r} is a "
                             f"{type(loaded.pipe).__name__}")
    if knobs["quant"] == "int8" and loaded.pipe.transformer.device.type != "cuda":
        raise DemoInputError(f"Quantization 'int8': {_INT8_REASON} (this demo runs on "
                             f"{loaded.pipe.transformer.device})")


def _litevar_apply(knobs: dict[str, Any], loaded: LoadedPipeline) -> Callable[[Any, ApplyCall], dict[str, Any]]:
    from ..api.litevar import apply_litevar
    from ..methods.litevar import LiteVARConfig

    _litevar_check(knobs, loaded)

    def apply(pipe: Any, call: ApplyCall) -> dict[str, Any]:
        masks, calib = (litevar_masks(loaded, knobs["mask_threshold"], call.progress) if knobs["masks"]
                        else (None, None))
        quant = None if knobs["quant"] == "none" else knobs["quant"]
        if quant == "int8":
            loaded.cache["stale"] = "the int8 conversion is one-way: the model is reloaded for the next run"
        apply_litevar(pipe, LiteVARConfig(masks=masks, share_cfg_attention=knobs["share_cfg"], quant=quant))
        return {"calibration": calib, "mask_summary": None if masks is None else
                {str(k): v for k, v in masks.summary().items()}, "quant": quant,
                "share_cfg_attention": knobs["share_cfg"]}

    return apply


def _litevar_describe(knobs: dict[str, Any], loaded: LoadedPipeline) -> dict[str, Any]:
    tr = loaded.pipe.transformer
    return {"masks": "calibrated" if knobs["masks"] else None, "mask_threshold": knobs["mask_threshold"],
            "calibration_labels": calibration_labels(int(tr.config.num_classes)) if knobs["masks"] else None,
            "share_cfg_attention": knobs["share_cfg"], "quant": None if knobs["quant"] == "none" else knobs["quant"],
            "mask_mode": "renormalized"}


def _remove_litevar(pipe: Any) -> None:
    from ..api.litevar import remove_litevar

    remove_litevar(pipe)


def _shade(share: float) -> tuple[int, int, int]:
    """White (nothing kept) to deep blue (all kept)."""
    s = min(max(share, 0.0), 1.0)
    return (int(235 - 200 * s), int(240 - 130 * s), int(250 - 30 * s))


def scale_plot(stats: Any, knobs: dict[str, Any], loaded: LoadedPipeline, cell_w: int = 54,
               cell_h: int = 20) -> np.ndarray | None:
    """RGB image: kept attention share of LiteVAR's masks per block (rows) and scale (columns), then the run's
    realized kept share and computed-score share per scale (the latter halves where CFG sharing reuses the
    conditional half's attention map); drawn at 2x."""
    tr = loaded.pipe.transformer
    SN, depth = len(tr.patch_nums), len(tr.blocks)
    masks = loaded.cache.get(f"litevar_masks@{knobs['mask_threshold']:.4f}") if knobs.get("masks") else None
    info = stats.info or {}
    kept_run = {int(k): float(v) for k, v in (info.get("kept_attention_share_per_scale") or {}).items()}
    comp_run = {int(k): float(v) for k, v in (info.get("computed_score_share_per_scale") or {}).items()}
    rows: list[tuple[str, list[float | None]]] = []
    for b in range(depth):
        rows.append((f"block {b}", [masks.kept_share(k, b) if masks is not None and k in masks.widths else 1.0
                                    for k in range(SN)]))
    rows.append(("run: kept", [kept_run.get(k) for k in range(SN)]))
    rows.append(("run: scores", [comp_run.get(k) for k in range(SN)]))
    left, top = 84, 44
    width = max(left + SN * cell_w + 10, 380)
    height = top + len(rows) * cell_h + 62
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), "kept share of (query, key) pairs per scale", fill=(0, 0, 0))
    for k in range(SN):
        pn = tr.patch_nums[k]
        draw.text((left + k * cell_w + 2, top - 16), f"s{k} {pn}x{pn}", fill=(80, 80, 80))
    for r, (name, vals) in enumerate(rows):
        y = top + r * cell_h + (6 if r >= depth else 0)
        draw.text((4, y + 4), name, fill=(0, 0, 0))
        for k, v in enumerate(vals):
            x = left + k * cell_w
            if v is None:
                draw.rectangle([x, y, x + cell_w - 3, y + cell_h - 3], outline=(200, 200, 200))
                continue
            draw.rectangle([x, y, x + cell_w - 3, y + cell_h - 3], fill=_shade(v))
            draw.text((x + 6, y + 4), f"{v:.2f}", fill=(255, 255, 255) if v > 0.55 else (0, 0, 0))
    y = top + len(rows) * cell_h + 14
    draw.text((4, y), "1.00 = full attention. Masks: " + ("off" if masks is None else
              f"calibrated at threshold {knobs['mask_threshold']:g}"), fill=(0, 0, 0))
    draw.text((4, y + 16), "run: scores < kept where CFG sharing computes one map for both halves", fill=(0, 0, 0))
    return np.asarray(img.resize((img.width * 2, img.height * 2), Image.NEAREST))


# ------------------------------------------------------------------------------------------------ FEAT

def _attention_layers(pipe: Any) -> int:
    adapter = get_adapter(pipe.transformer)
    return len(adapter.attention_layer_keys(dict(pipe.transformer.attn_processors)))


def _feat_apply(knobs: dict[str, Any], loaded: LoadedPipeline) -> Callable[[Any, ApplyCall], dict[str, Any]]:
    from ..api.feat import apply_feat
    from ..api.feat_training import collect_transformer_inputs, distill_feat
    from ..methods.feat import FEATConfig

    try:
        n_layers = _attention_layers(loaded.pipe)
    except (ValueError, TypeError) as e:
        raise DemoInputError(f"FEAT cannot run on {loaded.name!r}: {e}") from None
    n_soft = knobs["softmax_layers"]
    if n_soft > n_layers:
        raise DemoInputError(f"Softmax layers: the model has {n_layers} attention layers, got {n_soft}")
    config = FEATConfig(softmax_layers=tuple(range(n_soft)))

    def apply(pipe: Any, call: ApplyCall) -> dict[str, Any]:
        apply_feat(pipe, config)
        steps = knobs["distill_steps"]
        call.progress(f"FEAT: collecting transformer inputs, then distilling {steps} steps")
        t0 = time.perf_counter()
        gen = torch.Generator(call.device if call.device.type == "cuda" else "cpu").manual_seed(call.seed)
        inputs = collect_transformer_inputs(pipe, **call.kwargs, generator=gen, output_type="latent")
        report = distill_feat(pipe, inputs, steps=steps, lr=knobs["lr"], progress=False)
        out = {
            "distill_steps": steps, "lr": knobs["lr"], "distill_inputs": len(inputs),
            "distill_seconds": round(time.perf_counter() - t0, 3),
            "softmax_layers": list(config.softmax_layers), "feat_layers": sorted(report.before),
            "per_layer_error_before": {str(i): v for i, v in sorted(report.before.items())},
            "per_layer_error_after": {str(i): v for i, v in sorted(report.after.items())},
            "loss_first": report.losses[0] if report.losses else None,
            "loss_last": report.losses[-1] if report.losses else None,
            "error": "relative MSE of each layer's attention output vs softmax, on the teacher's inputs",
        }
        loaded.cache["feat_report"] = out
        return out

    return apply


def _feat_describe(knobs: dict[str, Any], loaded: LoadedPipeline) -> dict[str, Any]:
    return {"softmax_layers": list(range(knobs["softmax_layers"])), "distill_steps": knobs["distill_steps"],
            "lr": knobs["lr"], "distill_data": "transformer inputs of the same prompt and seed"}


def feat_plot(stats: Any, knobs: dict[str, Any], loaded: LoadedPipeline, bar_h: int = 14) -> np.ndarray | None:
    """RGB image: per attention layer, the FEAT output's relative error vs softmax before (grey) and after (green)
    the distillation, on a log axis; hybrid softmax layers are marked exact. Drawn at 2x."""
    rep = loaded.cache.get("feat_report")
    if not rep:
        return None
    before = {int(k): v for k, v in rep["per_layer_error_before"].items()}
    after = {int(k): v for k, v in rep["per_layer_error_after"].items()}
    layers = sorted(set(before) | set(rep["softmax_layers"]))
    vals = [v for v in (*before.values(), *after.values()) if v > 0]
    lo = np.floor(np.log10(min(vals))) if vals else -3.0
    hi = max(np.ceil(np.log10(max(vals))) if vals else 1.0, lo + 1)
    left, top, span = 70, 40, 300
    img = Image.new("RGB", (left + span + 90, top + len(layers) * (2 * bar_h + 8) + 50), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), f"relative error vs softmax, log10 axis [{int(lo)}, {int(hi)}]", fill=(0, 0, 0))

    def bar_len(v: float) -> int:
        return int(span * (np.log10(max(v, 10.0 ** lo)) - lo) / (hi - lo))

    y = top
    for i in layers:
        draw.text((4, y + bar_h // 2), f"layer {i}", fill=(0, 0, 0))
        if i in rep["softmax_layers"]:
            draw.text((left, y + bar_h // 2), "softmax (hybrid, exact)", fill=(90, 90, 90))
        else:
            for j, (src, color) in enumerate(((before, (150, 150, 150)), (after, (15, 157, 88)))):
                v = src.get(i)
                if v is None:
                    continue
                yy = y + j * bar_h
                draw.rectangle([left, yy, left + max(bar_len(v), 1), yy + bar_h - 3], fill=color)
                draw.text((left + max(bar_len(v), 1) + 4, yy), f"{v:.3g}", fill=(0, 0, 0))
        y += 2 * bar_h + 8
    draw.rectangle([4, y + 6, 16, y + 16], fill=(150, 150, 150))
    draw.text((22, y + 6), "before distillation", fill=(0, 0, 0))
    draw.rectangle([160, y + 6, 172, y + 16], fill=(15, 157, 88))
    draw.text((178, y + 6), f"after {rep['distill_steps']} steps", fill=(0, 0, 0))
    return np.asarray(img.resize((img.width * 2, img.height * 2), Image.NEAREST))


def litevar_method() -> DemoMethod:
    choices, unavailable = _quant_choices()
    return DemoMethod(
        key="litevar",
        label="LiteVAR (VAR: masks, CFG sharing, quantization)",
        conditioning="class_labels",
        knobs=(
            Knob("masks", "Windowed attention masks (MDWA)", "bool", True,
                 info="calibrated once per model on a few class labels, then cached"),
            Knob("mask_threshold", "Mask threshold", "float", 0.95, 0.5, 1.0, 0.01,
                 info="each kept band holds this share of its segment's attention mass in calibration"),
            Knob("share_cfg", "Share CFG attention (ASC)", "bool", True,
                 info="the unconditional half reuses the conditional half's attention map"),
            Knob("quant", "Quantization", "choice", "none", choices=choices, unavailable=unavailable,
                 info="fake-quant presets measure accuracy; int8 (CUDA) is the real int8 path"),
        ),
        make_apply=_litevar_apply,
        describe=_litevar_describe,
        remove=_remove_litevar,
        plot=scale_plot,
        plot_label="Kept attention share per block (rows) and scale (columns)",
        wants_call=True,
        load=lambda model, device, dtype: load_var_pipeline(model, device, dtype, seed=0),
        models=(*REFERENCE_VAR_MODELS, *TINY_VAR_MODELS),  # the trained ref-var first: the default
        description=(
            "Class-conditional VAR (next-scale prediction): enter class labels, one image per label. `ref-var` "
            "(trained, default): 36 classes, one image each: class c = shape c // 9 (disc, square, triangle, ring), "
            "colour (c // 3) % 3 (red, green, blue), placement c % 3 (top-left, centre, bottom-right), e.g. "
            "`1, 12, 25, 29`; `tiny-var` (random weights): ImageNet ids, e.g. `207, 360`."
            " Steps, frames and size do not apply (VAR has fixed scales and resolution). Masks "
            "change the math but run as masked dense attention (the kept share is what a sparse kernel would "
            "need)."
        ),
    )


def feat_method() -> DemoMethod:
    return DemoMethod(
        key="feat",
        label="FEAT (linear attention, distilled)",
        knobs=(
            Knob("distill_steps", "Distillation steps", "int", 20, 0, 500, 1,
                 info="on transformer inputs collected from this prompt and seed; 0 = untrained FEAT"),
            Knob("softmax_layers", "Softmax layers (hybrid)", "int", 0, 0, 64, 1,
                 info="the first N attention layers keep exact softmax"),
            Knob("lr", "Distillation learning rate", "float", 0.03, 0.0001, 0.1, 0.0001),
        ),
        make_apply=_feat_apply,
        describe=_feat_describe,
        plot=feat_plot,
        plot_label="FEAT: per-layer error vs softmax, before / after distillation",
        wants_call=True,
        models=(*REFERENCE_MODELS, *TINY_MODELS),
        description=(
            "FEAT replaces video x video softmax attention by linear attention (Bi-WKV scans along W, H, T plus "
            "channel attention). **It is only meaningful after distillation**: its new parameters start untrained, "
            "so the demo first distils them for a few steps on transformer inputs collected from this same prompt "
            "(a quick demonstration, not a trained adapter: the output is not expected to match dense). The "
            "figures show the per-layer error before / after the distillation."
        ),
    )


def register_builtin_methods() -> None:
    """Register RainFusion, LiteVAR and FEAT, in that order (the order of the page's dropdown and of the knob
    inputs of its ``/compare`` API); called once by the :mod:`diffusers_attn.demo` package."""
    for make in (rainfusion_method, litevar_method, feat_method):
        register_method(make())
