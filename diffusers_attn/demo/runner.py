"""The demo's engine, free of Gradio: validate a request, run dense and accelerated with the same seed, write the
two videos (or images: VAR, one per class label, in a row) and the method's figure (per-layer/head patterns by
default), and summarise latency, speedup, fidelity and density (the figures and summary are in :mod:`.report`)."""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import logging
import math
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..compare import ComparisonResult, LoadedPipeline, load_pipeline, resolve_device_dtype, run_comparison, write_video
from ..pipelines.tiny import TINY_MODELS, TINY_VAR_MODELS
from ..reference_models import REFERENCE_MODELS
from ..reference_models.var import REFERENCE_VAR_MODELS
from .methods import METHODS, ApplyCall, DemoInputError, get_method
from .report import (
    PATTERN_COLORS,
    PATTERN_LABELS,
    image_row,
    latency_caption,
    pattern_plot,
    summarize,
    summary_markdown,
    to_uint8,
)

logger = logging.getLogger(__name__)

# Limits for the built-in tiny models (they run on the demo host's CPU, keep the page responsive); real models are
# bounded by the GPU and get wider limits.
TINY_LIMITS = {"steps": (1, 50), "frames": (1, 49), "size": (32, 256)}
MODEL_LIMITS = {"steps": (1, 200), "frames": (1, 257), "size": (64, 2048)}
KEEP_RUNS = 4  # run folders kept per runner (older ones are deleted)

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
        # One folder per runner (session); it keeps the last KEEP_RUNS runs, and a folder the runner made itself
        # is removed when the process exits.
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="diffusers-attn-demo-"))
        if not out_dir:
            atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)
        self._runs: list[Path] = []
        self._loader = loader or (lambda m, d, t: load_pipeline(m, d, t, seed=0))
        self._cached: tuple[tuple[str, str], LoadedPipeline] | None = None
        self._lock = threading.Lock()

    # -- validation (cheap, before anything loads) ----------------------------------------------------------
    def validate(self, req: DemoRequest) -> tuple[Any, dict[str, Any]]:
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
        loaded = self._load_for(req, method, v)
        apply_fn = method.make_apply(v["knobs"], loaded)
        call, n_steps = _call_kwargs(loaded, method, v)
        progress = _PhaseProgress(report, method.key, req.warmup, n_steps, fixed_steps=loaded.num_steps is not None)
        method_report: dict[str, Any] = {}
        if method.wants_call or method.remove is not None:
            ctx = ApplyCall(kwargs={**loaded.prompt_kwargs(v["prompt"], req.negative_prompt or None), **call},
                            seed=v["seed"], device=self.device, progress=progress.method_message)
            apply_fn = _recording_apply(apply_fn, ctx if method.wants_call else None, method_report)
        try:
            result = run_comparison(
                loaded, apply_fn, method_name=method.key, prompt=v["prompt"],
                negative_prompt=req.negative_prompt or None, call_kwargs=call, seed=v["seed"], device=self.device,
                warmup=req.warmup, note=_note(req.model, loaded), progress=progress.step, remove_fn=method.remove,
            )
        finally:
            if loaded.cache.get("stale"):  # the method changed the model for good (LiteVAR int8): reload next time
                logger.info("demo: dropping the cached model: %s", loaded.cache["stale"])
                self._cached = None
        report(0.96, "writing outputs")
        return self._result(result, method, loaded, v, method_report)

    def _load_for(self, req: DemoRequest, method: Any, v: dict[str, Any]) -> LoadedPipeline:
        """The request's model, with its uploaded embeddings, checked against the method's conditioning."""
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
        return loaded

    def _new_run_dir(self) -> Path:
        """A fresh folder for one run's outputs; the oldest beyond :data:`KEEP_RUNS` are deleted (the page has
        already been served their files: Gradio copies outputs into its own cache)."""
        run_dir = self.out_dir / uuid.uuid4().hex[:12]
        self._runs.append(run_dir)
        while len(self._runs) > KEEP_RUNS:
            shutil.rmtree(self._runs.pop(0), ignore_errors=True)
        return run_dir

    def _result(self, result: ComparisonResult, method: Any, loaded: LoadedPipeline, v: dict[str, Any],
                method_report: dict[str, Any]) -> DemoResult:
        """Write the two outputs and assemble the figures, captions and summary."""
        run_dir = self._new_run_dir()
        is_image = loaded.kind == "image" or result.dense.frames.shape[0] == 1
        outputs = (("dense", result.dense.frames), (method.key, result.accelerated.frames))
        if is_image:
            run_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for name, frames in outputs:
                p = run_dir / f"{name}.png"
                Image.fromarray(to_uint8(image_row(frames))).save(p)  # a batch (one per class label) in a row
                paths.append(str(p))
        else:
            paths = [str(write_video(run_dir / f"{name}.mp4", to_uint8(frames), fps=v["fps"]))
                     for name, frames in outputs]
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
            dense_caption=latency_caption("Dense", result.dense.denoise_s, result.dense.total_s, sampling),
            accel_caption=latency_caption(method.label, result.accelerated.denoise_s, result.accelerated.total_s,
                                          sampling),
            summary_md=summary_markdown(result, method.label, kind=loaded.kind, method_report=method_report),
            is_image=is_image,
        )


def _call_kwargs(loaded: LoadedPipeline, method: Any, v: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The pipeline call of the comparison and its number of steps (VAR: its scales)."""
    if loaded.num_steps is not None:  # VAR: fixed scales and resolution; steps/frames/size do not apply
        return {**loaded.defaults, **method.defaults}, loaded.num_steps
    call = {**loaded.defaults, **method.defaults, "num_inference_steps": v["steps"],
            "num_frames": v["frames"], "height": v["height"], "width": v["width"]}
    if "num_frames" not in inspect.signature(loaded.pipe.__call__).parameters:
        call.pop("num_frames")  # image pipelines
    return call, v["steps"]


def _recording_apply(inner: Callable[..., Any], ctx: ApplyCall | None,
                     method_report: dict[str, Any]) -> Callable[[Any], None]:
    """``apply(pipe)`` calling ``inner(pipe, ctx)`` (``inner(pipe)`` without ``ctx``); a dict it returns (what the
    preparation did) is kept in ``method_report``."""

    def apply_fn(pipe: Any) -> None:
        out = inner(pipe, ctx) if ctx is not None else inner(pipe)
        if isinstance(out, dict):
            method_report.update(out)

    return apply_fn


def _note(model: str, loaded: LoadedPipeline) -> str | None:
    if model in REFERENCE_MODELS:
        return ("small reference model trained on procedural clips: fidelity to dense is meaningful, "
                "CPU timings at this size measure overheads, not attention speed")
    if model in REFERENCE_VAR_MODELS:
        return ("small reference VAR trained on procedural shape images (36 classes): fidelity to dense is "
                "meaningful, CPU timings at this size measure overheads, not attention speed")
    if model in TINY_MODELS or model in TINY_VAR_MODELS:
        return "tiny random-weight model: figures check the plumbing, not quality"
    return None


class _PhaseProgress:
    """The page's progress over the comparison's phases (warm-ups, dense, the method), 0.05 to 0.95 by steps."""

    def __init__(self, report: Callable[[float, str], None], method_key: str, warmup: bool, n_steps: int,
                 fixed_steps: bool) -> None:
        self.report = report
        self.phases = (["warm-up (dense)"] if warmup else []) + ["dense"] + (
            [f"warm-up ({method_key})"] if warmup else []) + [method_key]
        warm_units = n_steps if fixed_steps else 1  # VAR's warm-up is a full run
        self.units = {p: (warm_units if p.startswith("warm-up") else n_steps) for p in self.phases}
        self.before = {p: sum(self.units[q] for q in self.phases[:i]) for i, p in enumerate(self.phases)}
        self.grand = sum(self.units.values())

    def step(self, phase: str, done: int, total: int) -> None:
        frac = 0.05 + 0.9 * (self.before.get(phase, 0) + min(done, self.units.get(phase, 1))) / self.grand
        self.report(frac, f"{phase}: step {done}/{total}")

    def method_message(self, desc: str) -> None:
        """A line from the method's preparation: it runs right after the dense run, at the start of the next phase."""
        after_dense = self.phases[self.phases.index("dense") + 1]
        self.report(0.05 + 0.9 * self.before[after_dense] / self.grand, desc)


__all__ = ["MODEL_LIMITS", "PATTERN_COLORS", "PATTERN_LABELS", "TINY_LIMITS", "DemoRequest", "DemoResult", "DemoRunner",
           "image_row", "load_embeddings", "pattern_plot", "summarize", "summary_markdown"]
