"""The demo's engine, free of Gradio: validate a request, run dense and accelerated with the same seed, write the
two videos (or images: VAR, one per class label, in a row) and the method's figure (per-layer/head patterns by
default), and summarise latency, speedup, fidelity and density."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..compare import ComparisonResult, LoadedPipeline, load_pipeline, resolve_device_dtype, run_comparison, write_video
from ..stats import AttentionStats
from .methods import METHODS, DemoInputError, get_method

logger = logging.getLogger(__name__)

# Limits for the built-in tiny models (they run on the demo host's CPU, keep the page responsive); real models are
# bounded by the GPU and get wider limits.
TINY_LIMITS = {"steps": (1, 50), "frames": (1, 49), "size": (32, 256)}
MODEL_LIMITS = {"steps": (1, 200), "frames": (1, 257), "size": (64, 2048)}

PATTERN_COLORS = {
    "dense": (140, 140, 140),
    "spatial": (66, 133, 244),
    "temporal": (244, 160, 0),
    "textural": (15, 157, 88),
    "fallback": (70, 70, 70),
}
PATTERN_LABELS = {"dense": "dense (ARM)", "spatial": "Spatial", "temporal": "Temporal", "textural": "Textural",
                  "fallback": "dense (warm-up / dense layer / fallback)"}


@dataclass
class DemoRequest:
    """What the page sends. ``prompt`` holds class labels ("207, 360") for class-conditioned methods."""

    model: str = "ref-cogvideox"
    method: str = "rainfusion"
    prompt: str = ""
    negative_prompt: str = ""
    embeddings_path: str | None = None
    knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    steps: int = 16
    frames: int = 9
    height: int = 32
    width: int = 32
    warmup: bool = True
    fps: int = 8


@dataclass
class DemoResult:
    dense_video: str
    accel_video: str
    pattern_plot: np.ndarray | None
    metrics: dict[str, Any]
    dense_caption: str
    accel_caption: str
    summary_md: str
    is_image: bool


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name}: expected a whole number, got {value!r}") from None
    if not math.isfinite(num) or num != int(num):
        raise DemoInputError(f"{name}: expected a whole number, got {value!r}")
    if not lo <= num <= hi:
        raise DemoInputError(f"{name} must be in [{lo}, {hi}], got {int(num)}")
    return int(num)


def load_embeddings(path: str, pipe: Any) -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments (``prompt_embeds``, ...) saved with ``torch.save`` as a dict of tensors."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is an input error here
        raise DemoInputError(f"cannot read the embeddings file: {e.__class__.__name__}: {e}") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise DemoInputError("the embeddings file must hold a dict of tensors, e.g. {'prompt_embeds': ...}")
    accepted = set(inspect.signature(pipe.__call__).parameters)
    unknown = sorted(set(data) - accepted)
    if unknown:
        embeds = sorted(k for k in accepted if "embeds" in k or "attention_mask" in k)
        raise DemoInputError(f"embeddings file has keys this pipeline does not take: {unknown}; it takes {embeds}")
    return data


class DemoRunner:
    """Runs comparisons one at a time (a lock backs up the queue's concurrency limit) and caches the last model."""

    def __init__(self, device: str | None = None, dtype: str | None = "auto", out_dir: str | Path | None = None,
                 loader: Callable[[str, torch.device, torch.dtype], LoadedPipeline] | None = None) -> None:
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="diffusers-attn-demo-"))
        self._loader = loader or (lambda m, d, t: load_pipeline(m, d, t, seed=0))
        self._cached: tuple[tuple[str, str], LoadedPipeline] | None = None
        self._lock = threading.Lock()

    # -- validation (cheap, before anything loads) ----------------------------------------------------------
    def validate(self, req: DemoRequest) -> tuple[Any, dict[str, Any]]:
        from ..pipelines.tiny import TINY_MODELS, TINY_VAR_MODELS
        from ..reference_models import REFERENCE_MODELS

        method = get_method(req.method)
        knobs = method.validate_knobs(req.knobs)
        if not isinstance(req.model, str) or not req.model.strip():
            raise DemoInputError("choose a model: a built-in tiny model, a diffusers hub id or a local folder")
        lim = TINY_LIMITS if req.model in TINY_MODELS + TINY_VAR_MODELS + REFERENCE_MODELS else MODEL_LIMITS
        text = (req.prompt or "").strip()
        if method.conditioning == "class_labels":
            # The syntax here; the range against the model's number of classes once it is loaded.
            labels = [p for p in text.replace(",", " ").split() if p]
            if not labels:
                raise DemoInputError("enter one or more class labels (ImageNet ids), e.g. 207, 360")
            for p in labels:
                if not p.isdigit():
                    raise DemoInputError(f"class labels must be non-negative integers, got {p!r}")
        elif not text and not req.embeddings_path:
            raise DemoInputError("the prompt is empty: type a prompt (or upload a prompt-embeddings file)")
        if len(text) > 2000:
            raise DemoInputError(f"the prompt is too long ({len(text)} characters, at most 2000)")
        checked = {
            "seed": _int_in("Seed", req.seed, 0, 2**32 - 1),
            "fps": _int_in("FPS", req.fps, 1, 60),
        }
        if method.conditioning != "class_labels":
            checked.update(steps=_int_in("Steps", req.steps, *lim["steps"]),
                           frames=_int_in("Frames", req.frames, *lim["frames"]),
                           height=_int_in("Height", req.height, *lim["size"]),
                           width=_int_in("Width", req.width, *lim["size"]))
        if method.conditioning == "class_labels":  # VAR: fixed scales and resolution, the video fields do not apply
            return method, {**checked, "knobs": knobs, "prompt": text}
        for side in ("height", "width"):
            if checked[side] % 16:
                raise DemoInputError(f"{side.capitalize()} must be a multiple of 16, got {checked[side]}")
        return method, {**checked, "knobs": knobs, "prompt": text}

    def _load(self, method: Any, model: str) -> LoadedPipeline:
        key = (method.key if method.load else "", model)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # free the previous model first (one model on the device at a time)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        loader = method.load or self._loader
        try:
            loaded = loader(model, self.device, self.dtype)
        except (ValueError, OSError, KeyError) as e:
            raise DemoInputError(str(e)) from None
        self._cached = (key, loaded)
        return loaded

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, req: DemoRequest, progress: Callable[[float, str], None] | None = None) -> DemoResult:
        method, v = self.validate(req)
        report = progress or (lambda frac, desc: None)
        with self._lock:
            try:
                return self._run(req, method, v, report)
            except DemoInputError:
                raise
            except torch.OutOfMemoryError:
                self._cached = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise DemoInputError(
                    "out of memory: try fewer frames, a lower resolution or fewer steps (the model was unloaded)"
                ) from None
            except MemoryError:
                self._cached = None
                raise DemoInputError("out of host memory: try fewer frames or a lower resolution") from None
            except Exception as e:  # noqa: BLE001 - the page shows one readable line, the log keeps the trace
                logger.exception("demo run failed")
                raise DemoInputError(f"the run failed: {e.__class__.__name__}: {e}") from None

    def _run(self, req: DemoRequest, method: Any, v: dict[str, Any],
             report: Callable[[float, str], None]) -> DemoResult:
        report(0.0, f"loading {req.model}")
        loaded = self._load(method, req.model)
        if req.embeddings_path:
            embeds = load_embeddings(req.embeddings_path, loaded.pipe)
            loaded = dataclasses.replace(loaded, prompt_kwargs=lambda _p, _n=None: dict(embeds))
        if loaded.kind == "image" and method.conditioning != "class_labels":
            var_methods = [m.label for m in METHODS.values() if m.conditioning == "class_labels"]
            raise DemoInputError(f"{req.model!r} is a class-conditional image model (class labels, no prompt): "
                                 f"{method.label} does not apply; use {', '.join(var_methods)}")
        if method.conditioning == "class_labels":
            try:  # the class labels against the loaded model's classes, before anything runs
                loaded.prompt_kwargs(v["prompt"], req.negative_prompt or None)
            except ValueError as e:
                raise DemoInputError(str(e)) from None
        apply_fn = method.make_apply(v["knobs"], loaded)
        if loaded.num_steps is not None:  # VAR: fixed scales and resolution; steps/frames/size do not apply
            call = {**loaded.defaults, **method.defaults}
            n_steps = loaded.num_steps
        else:
            call = {**loaded.defaults, **method.defaults, "num_inference_steps": v["steps"],
                    "num_frames": v["frames"], "height": v["height"], "width": v["width"]}
            if "num_frames" not in inspect.signature(loaded.pipe.__call__).parameters:
                call.pop("num_frames")  # image pipelines
            n_steps = v["steps"]
        method_report: dict[str, Any] = {}
        if method.wants_call or method.remove is not None:
            from .methods import ApplyCall

            inner = apply_fn
            gen_kwargs = {**loaded.prompt_kwargs(v["prompt"], req.negative_prompt or None), **call}
            # apply runs right after the dense run: report it at the start of the next phase
            ctx = ApplyCall(kwargs=gen_kwargs, seed=v["seed"], device=self.device,
                            progress=lambda desc: report(0.05 + 0.9 * before[phases[phases.index("dense") + 1]]
                                                         / grand, desc))

            def apply_fn(pipe: Any) -> None:
                out = inner(pipe, ctx) if method.wants_call else inner(pipe)
                if isinstance(out, dict):
                    method_report.update(out)
        phases = (["warm-up (dense)"] if req.warmup else []) + ["dense"] + (
            [f"warm-up ({method.key})"] if req.warmup else []) + [method.key]
        warm_units = n_steps if loaded.num_steps is not None else 1
        units = {p: (warm_units if p.startswith("warm-up") else n_steps) for p in phases}
        before = {p: sum(units[q] for q in phases[: i]) for i, p in enumerate(phases)}
        grand = sum(units.values())

        def on_progress(phase: str, done: int, total: int) -> None:
            frac = 0.05 + 0.9 * (before.get(phase, 0) + min(done, units.get(phase, 1))) / grand
            report(frac, f"{phase}: step {done}/{total}")

        from ..reference_models import REFERENCE_MODELS

        if req.model in REFERENCE_MODELS:
            note = ("small reference model trained on procedural clips: fidelity to dense is meaningful, "
                    "CPU timings at this size measure overheads, not attention speed")
        elif loaded.tiny:
            note = "tiny random-weight model: figures check the plumbing, not quality"
        else:
            note = None
        try:
            result = run_comparison(
                loaded, apply_fn, method_name=method.key, prompt=v["prompt"],
                negative_prompt=req.negative_prompt or None, call_kwargs=call, seed=v["seed"], device=self.device,
                warmup=req.warmup, note=note, progress=on_progress, remove_fn=method.remove,
            )
        finally:
            if loaded.cache.get("stale"):  # the method changed the model for good (LiteVAR int8): reload next time
                logger.info("demo: dropping the cached model: %s", loaded.cache["stale"])
                self._cached = None
        report(0.96, "writing outputs")
        run_dir = self.out_dir / uuid.uuid4().hex[:12]
        is_image = loaded.kind == "image" or result.dense.frames.shape[0] == 1
        if is_image:
            from PIL import Image

            run_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for name, frames in (("dense", result.dense.frames), (method.key, result.accelerated.frames)):
                p = run_dir / f"{name}.png"
                Image.fromarray(_to_uint8(image_row(frames))).save(p)  # a batch (one per class label) in a row
                paths.append(str(p))
        else:
            paths = [str(write_video(run_dir / f"{name}.mp4", _to_uint8(frames), fps=v["fps"]))
                     for name, frames in (("dense", result.dense.frames), (method.key, result.accelerated.frames))]
        metrics = summarize(result, kind=loaded.kind)
        if method_report:
            metrics["method_report"] = method_report
        if loaded.num_steps is not None:
            metrics["settings"]["ignored"] = "steps, frames, height, width (fixed by the VAR model)"
        plot = (method.plot(result.stats, v["knobs"], loaded) if method.plot is not None
                else pattern_plot(result.stats))
        sampling = "sampling" if loaded.kind == "image" else "denoising"
        return DemoResult(
            dense_video=paths[0], accel_video=paths[1], pattern_plot=plot, metrics=metrics,
            dense_caption=_caption("Dense", result.dense.denoise_s, result.dense.total_s, sampling),
            accel_caption=_caption(method.label, result.accelerated.denoise_s, result.accelerated.total_s, sampling),
            summary_md=summary_markdown(result, method.label, kind=loaded.kind, method_report=method_report),
            is_image=is_image,
        )


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_row(frames: np.ndarray, gap: int = 4) -> np.ndarray:
    """(N, H, W, 3) images -> one (H, N W + gaps, 3) image, white gaps between them."""
    if frames.shape[0] == 1:
        return frames[0]
    sep = np.ones((frames.shape[1], gap, 3), dtype=frames.dtype)
    parts = []
    for i, f in enumerate(frames):
        parts += ([sep] if i else []) + [f]
    return np.concatenate(parts, axis=1)


def _caption(label: str, denoise_s: float, total_s: float, phase: str = "denoising") -> str:
    return f"**{label}** — {phase} latency **{denoise_s:.3f} s**, total latency **{total_s:.3f} s**"


def _fmt_db(x: float) -> str:
    return "inf (identical)" if math.isinf(x) else f"{x:.2f} dB"


def summarize(result: ComparisonResult, kind: str = "video") -> dict[str, Any]:
    """JSON-friendly figures of one comparison (also the API output). For images (VAR) ``density`` is the kept
    attention share of the masks and ``computed_score_share`` what was computed (CFG sharing halves it)."""
    finite = lambda x: None if math.isinf(x) else x  # noqa: E731 - JSON has no inf
    if kind == "image":
        st = result.stats
        return {
            "dense_sampling_s": result.dense.denoise_s,
            "dense_total_s": result.dense.total_s,
            "accelerated_sampling_s": result.accelerated.denoise_s,
            "accelerated_total_s": result.accelerated.total_s,
            "speedup_total": result.speedup,
            "speedup_sampling": result.denoise_speedup,
            "psnr_db": finite(result.psnr_db),
            "psnr_per_image_db": finite(result.psnr_per_frame_db),
            "identical": math.isinf(result.psnr_db),
            "ssim": result.ssim,
            "density": st.video_density,
            "computed_score_share": st.density,
            "kept_share_per_scale": {str(k): v for k, v in
                                     (st.info.get("kept_attention_share_per_scale") or {}).items()},
            "computed_score_share_per_scale": {str(k): v for k, v in
                                               (st.info.get("computed_score_share_per_scale") or {}).items()},
            "kernel_calls": dict(st.kernel_backends),
            "quantized_layers": len(st.info.get("quantized_layers") or []),
            "settings": {k: v for k, v in result.settings.items() if isinstance(v, (int, float, str, bool))},
        }
    return {
        "dense_denoise_s": result.dense.denoise_s,
        "dense_total_s": result.dense.total_s,
        "accelerated_denoise_s": result.accelerated.denoise_s,
        "accelerated_total_s": result.accelerated.total_s,
        "speedup_total": result.speedup,
        "speedup_denoise": result.denoise_speedup,
        "psnr_db": finite(result.psnr_db),
        "psnr_per_frame_db": finite(result.psnr_per_frame_db),
        "ssim": result.ssim,
        "density": result.stats.density,
        "video_density": result.stats.video_density,
        "pattern_histogram": result.stats.pattern_histogram,
        "dense_fallbacks": result.stats.dense_fallbacks,
        "settings": {k: v for k, v in result.settings.items() if isinstance(v, (int, float, str, bool))},
    }


def summary_markdown(result: ComparisonResult, label: str, kind: str = "video",
                     method_report: dict[str, Any] | None = None) -> str:
    s = result.settings
    if kind == "image":
        return _summary_markdown_image(result, label)
    lines = [
        "| | Dense | " + label + " |",
        "|---|---|---|",
        f"| Denoising latency | {result.dense.denoise_s:.3f} s | {result.accelerated.denoise_s:.3f} s |",
        f"| Total latency (with VAE decode) | {result.dense.total_s:.3f} s | {result.accelerated.total_s:.3f} s |",
        "",
        f"**Speedup:** {result.speedup:.2f}x total, {result.denoise_speedup:.2f}x denoising  ",
        f"**PSNR** vs dense: {_fmt_db(result.psnr_db)} (global MSE), {_fmt_db(result.psnr_per_frame_db)} "
        "(per-frame mean)  ",
        f"**SSIM** vs dense: {result.ssim:.4f} (Gaussian 11x11, sigma 1.5, RGB channels averaged)  ",
        f"**Realized density:** {result.stats.density:.3f} of dense (all tokens), {result.stats.video_density:.3f} "
        "(video x video)  ",
        f"{s['device']} {s['dtype']}, seed {s['seed']}, warm-up run excluded from timing: {s['warmup']}",
    ]
    rep = method_report or {}
    if "per_layer_error_before" in rep:
        b = list(rep["per_layer_error_before"].values())
        a = list(rep["per_layer_error_after"].values())
        if b:
            lines.append(f"**FEAT distillation** ({rep['distill_steps']} steps on {rep['distill_inputs']} "
                         f"transformer inputs of this prompt, {rep['distill_seconds']:.1f} s): mean per-layer "
                         f"relative error {np.mean(b):.4f} -> {np.mean(a):.4f}  ")
        else:
            lines.append("**FEAT**: every attention layer is a softmax layer (hybrid), nothing to distil  ")
    if s.get("note"):
        lines.append(f"\n_Note: {s['note']}._")
    return "\n".join(lines)


def _summary_markdown_image(result: ComparisonResult, label: str) -> str:
    s, st = result.settings, result.stats
    lines = [
        "| | Dense | " + label + " |",
        "|---|---|---|",
        f"| Sampling latency (all scales) | {result.dense.denoise_s:.3f} s | {result.accelerated.denoise_s:.3f} s |",
        f"| Total latency (with VQVAE decode) | {result.dense.total_s:.3f} s | {result.accelerated.total_s:.3f} s |",
        "",
        f"**Speedup:** {result.speedup:.2f}x total, {result.denoise_speedup:.2f}x sampling  ",
        f"**PSNR** vs dense: {_fmt_db(result.psnr_db)} (global MSE over all images), "
        f"{_fmt_db(result.psnr_per_frame_db)} (per-image mean)  ",
        f"**SSIM** vs dense: {result.ssim:.4f} (Gaussian 11x11, sigma 1.5, RGB channels averaged)  ",
        f"**Kept attention share:** {st.video_density:.3f} of dense (masks); attention scores computed: "
        f"{st.density:.3f} (CFG sharing computes one map for both halves)  ",
        f"{s['device']} {s['dtype']}, seed {s['seed']}, warm-up run excluded from timing: {s['warmup']}",
    ]
    if s.get("note"):
        lines.append(f"\n_Note: {s['note']}._")
    return "\n".join(lines)


def pattern_plot(stats: AttentionStats, cell_w: int = 30, cell_h: int = 18) -> np.ndarray | None:
    """RGB image: one row per attention layer, one cell per head, each cell split by the share of calls that ran
    each pattern (Spatial, Temporal, Textural, dense); drawn at 2x. ``None`` when the method records no per-head
    patterns."""
    from PIL import Image, ImageDraw

    layers = [layer for layer in stats.layers if layer.head_patterns]
    if not layers:
        return None
    heads = max(len(layer.head_patterns) for layer in layers)
    left, top, legend_h = 70, 40, 22 * len(PATTERN_COLORS) + 8
    width = max(left + heads * cell_w + 10, 360)
    height = top + len(layers) * cell_h + legend_h + 10
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), "share of calls per pattern", fill=(0, 0, 0))
    for h in range(heads):
        draw.text((left + h * cell_w + 2, top - 13), f"h{h}", fill=(80, 80, 80))
    for r, layer in enumerate(layers):
        y = top + r * cell_h
        draw.text((4, y + 3), f"layer {layer.layer}", fill=(0, 0, 0))
        for h, counts in enumerate(layer.head_patterns):
            total = sum(counts.values())
            x = left + h * cell_w
            if not total:
                continue
            for name in PATTERN_COLORS:
                n = counts.get(name, 0)
                if not n:
                    continue
                w = round((cell_w - 2) * n / total)
                draw.rectangle([x, y, x + max(w, 1) - 1, y + cell_h - 3], fill=PATTERN_COLORS[name])
                x += w
    y = top + len(layers) * cell_h + 8
    for name, color in PATTERN_COLORS.items():
        draw.rectangle([4, y, 18, y + 12], fill=color)
        draw.text((24, y), PATTERN_LABELS[name], fill=(0, 0, 0))
        y += 22
    return np.asarray(img.resize((img.width * 2, img.height * 2), Image.NEAREST))  # crisp at page scale
