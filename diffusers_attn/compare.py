"""Dense vs accelerated comparison with the same seed: the engine behind ``diffusers-attn compare`` and the demo."""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import deprecation_utils

from .adapters import get_adapter, supported_transformers
from .cli_checks import check_device
from .eval.metrics import finite_mean, psnr, psnr_frames, ssim
from .hub import check_hub_model, quiet_hub
from .install import get_attention_stats, remove_attention_acceleration
from .pipelines.tiny import TINY_MODELS, TINY_VAR_MODELS, build_tiny_pipeline, build_tiny_var
from .pipelines.var import VARPipeline
from .reference_models import DEFAULT_PROMPT, REFERENCE_MODELS, load_reference_pipeline
from .reference_models.var import DEFAULT_CALL, DEFAULT_CLASS_LABELS, REFERENCE_VAR_MODELS, load_reference_var_pipeline
from .run_timing import RunResult, _decode_module, generate  # noqa: F401 - generate re-exported; compare.generate is patched in tests
from .stats import AttentionStats
from .video import side_by_side_frames, write_video  # noqa: F401 - re-exported (cli, demo, benchmarks)

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    """A pipeline plus how to turn a prompt into call arguments."""

    pipe: Any
    name: str
    prompt_kwargs: Callable[[str, str | None], dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False
    # "video" (diffusers video pipelines) or "image" (a batch of images, e.g. VAR: one image per class label).
    kind: str = "video"
    # For pipelines without ``callback_on_step_end`` (VAR): a submodule called once per step (``transformer.head``:
    # once per scale) and one whose first call ends the sampling phase (``vqvae.post_quant_conv``: decode starts).
    step_module: str | None = None
    decode_module: str | None = None
    num_steps: int | None = None  # fixed step count of such pipelines (VAR: the number of scales)
    cache: dict[str, Any] = field(default_factory=dict)  # per-loaded-model state (LiteVAR calibrated masks)
    default_prompt: str | None = None  # a prompt the model knows (the reference models' caption grammar)


@dataclass
class ComparisonResult:
    dense: RunResult
    accelerated: RunResult
    psnr_db: float
    psnr_per_frame_db: float | None  # mean over the frames (images) that differ; None when all are identical
    ssim: float
    stats: AttentionStats
    settings: dict[str, Any]
    # why the timing ratio is not a speedup (nothing ran sparse, or a model too small to time), else None
    speedup_withheld: str | None = None
    identical_frames: int = 0  # frames (images) equal to dense: infinite PSNR, left out of the per-frame mean

    @property
    def speedup(self) -> float:
        """Ratio of the median total times."""
        return self.dense.total_s / self.accelerated.total_s

    @property
    def speedup_range(self) -> tuple[float, float]:
        """Lowest and highest ratio over all (dense run, accelerated run) pairs."""
        d = self.dense.total_times or [self.dense.total_s]
        a = self.accelerated.total_times or [self.accelerated.total_s]
        return min(d) / max(a), max(d) / min(a)

    def speedup_text(self) -> str:
        """"1.45x total (median of 3; 1.38-1.52 over run pairs), ..." or why there is no speedup to report."""
        if self.speedup_withheld:
            return f"not reported: {self.speedup_withheld}"
        n = len(self.dense.total_times or [0])
        lo, hi = self.speedup_range
        spread = f" (median of {n} runs each; {lo:.2f}-{hi:.2f}x over run pairs)" if n > 1 else " (single run)"
        return f"{self.speedup:.2f}x total{spread}, {self.denoise_speedup:.2f}x denoise"

    @property
    def denoise_speedup(self) -> float:
        return self.dense.denoise_s / self.accelerated.denoise_s

    def report(self) -> str:
        s = self.settings
        lines = [
            f"model: {s['model']} ({s['transformer']}), {s['num_frames']} frames {s['height']}x{s['width']}, "
            f"{s['num_inference_steps']} steps, seed {s['seed']}, {s['device']} {s['dtype']}",
            f"dense:        total {self.dense.total_s:8.3f} s   denoise {self.dense.denoise_s:8.3f} s   "
            f"({self.dense.spread})",
            f"{s['method']:<13} total {self.accelerated.total_s:8.3f} s   denoise {self.accelerated.denoise_s:8.3f} s"
            f"   ({self.accelerated.spread})",
            f"speedup:      {self.speedup_text()}",
            f"fidelity vs dense (same seed): PSNR {format_psnr(self.psnr_db)} (global MSE; "
            f"{self.per_frame_text()}), SSIM {self.ssim:.4f} (Gaussian 11x11, RGB mean)",
            f"realized density: {self.stats.density:.3f} (all tokens), {self.stats.video_density:.3f} "
            "(video x video)",
        ]
        if self.stats.pattern_video_density:
            lines.append("executed video density per pattern: " + ", ".join(
                f"{k} {v:.3f}" for k, v in self.stats.pattern_video_density.items()))
        if s.get("note"):
            lines.append(f"note: {s['note']}")
        return "\n".join(lines)

    def per_frame_text(self, unit: str = "frame") -> str:
        """"per-frame mean 31.20 dB (2 of 9 frames identical)" or "every frame identical"."""
        n = self.identical_frames
        if self.psnr_per_frame_db is None:
            return f"every {unit} identical"
        ident = f" over the {unit}s that differ, {n} identical" if n else ""
        return f"per-{unit} mean {self.psnr_per_frame_db:.2f} dB{ident}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "dense": {"total_s": self.dense.total_s, "denoise_s": self.dense.denoise_s,
                      "total_times": self.dense.total_times, "denoise_times": self.dense.denoise_times},
            "accelerated": {"total_s": self.accelerated.total_s, "denoise_s": self.accelerated.denoise_s,
                            "total_times": self.accelerated.total_times,
                            "denoise_times": self.accelerated.denoise_times},
            "speedup": self.speedup,
            "speedup_range": list(self.speedup_range),
            "speedup_withheld": self.speedup_withheld,
            "denoise_speedup": self.denoise_speedup,
            "psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db,  # JSON has no inf
            "identical": math.isinf(self.psnr_db),
            "psnr_per_frame_db": self.psnr_per_frame_db,
            "identical_frames": self.identical_frames,
            "ssim": self.ssim,
            "stats": self.stats.to_dict(),
        }


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """``device`` (default: cuda when available) checked against this torch; ``dtype`` ``auto`` or a name."""
    check_device(device)  # one line for "cuda" on a CPU-only torch, not an assertion deep inside .to()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype is None or dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return dev, dt


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedPipeline:
    """A built-in trained reference model or tiny random pipeline by name, or a diffusers pipeline from a hub id /
    local folder."""
    if model in TINY_VAR_MODELS or model in REFERENCE_VAR_MODELS:
        return load_var_pipeline(model, device, dtype, seed=seed)
    if model in REFERENCE_MODELS:
        spec = load_reference_pipeline(model, device, dtype)
        return LoadedPipeline(spec.pipe, model, spec.prompt_kwargs, dict(spec.defaults or {}), tiny=True,
                              default_prompt=DEFAULT_PROMPT)
    if model in TINY_MODELS:
        spec = build_tiny_pipeline(model, seed=seed)
        spec.pipe.to(device)
        if dtype != torch.float32:
            spec.pipe.to(dtype=dtype)
        return LoadedPipeline(spec.pipe, model, spec.prompt_kwargs, dict(spec.defaults or {}), tiny=True,
                              decode_module=_decode_module(spec.pipe))

    # Check the transformer class from the (small) config before loading any weights; a path that does not exist
    # or an unreachable Hub is said in one line before huggingface_hub retries.
    builtin = (*REFERENCE_MODELS, *TINY_MODELS)
    check_hub_model(model, builtin)
    try:
        with quiet_hub(logger.isEnabledFor(logging.DEBUG)):
            cfg = DiffusionPipeline.load_config(model)
    except Exception as e:  # network errors, missing folders, bad ids
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"cannot load model {model!r}: {e.__class__.__name__}: {first} Built-in offline models: "
            f"{', '.join(builtin)}"
        ) from None
    entry = cfg.get("transformer")
    cls_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if cls_name not in supported_transformers():
        raise ValueError(
            f"model {model!r} has transformer {cls_name!r}; supported: {', '.join(supported_transformers())}"
        )
    # diffusers renamed torch_dtype -> dtype (the old name warns); older releases only know torch_dtype.
    dtype_key = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    pipe = DiffusionPipeline.from_pretrained(model, **{dtype_key: dtype}).to(device)
    get_adapter(pipe.transformer)

    def prompt_kwargs(prompt: str, negative_prompt: str | None = None) -> dict[str, Any]:
        kw: dict[str, Any] = {"prompt": prompt}
        if negative_prompt:
            kw["negative_prompt"] = negative_prompt
        return kw

    return LoadedPipeline(pipe, model, prompt_kwargs, {}, tiny=False, decode_module=_decode_module(pipe))


def parse_class_labels(text: str, num_classes: int, max_labels: int = 8) -> list[int]:
    """``"207, 360"`` -> ``[207, 360]``; ``ValueError`` naming the accepted range for anything else."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    if not parts:
        raise ValueError(f"enter one or more class labels (integers in [0, {num_classes - 1}]), e.g. 207, 360")
    if len(parts) > max_labels:
        raise ValueError(f"at most {max_labels} class labels per run, got {len(parts)}")
    labels = []
    for p in parts:
        if not p.isdigit() or int(p) >= num_classes:
            raise ValueError(f"class label {p!r} is not an integer in [0, {num_classes - 1}] (this model has "
                             f"{num_classes} classes)")
        labels.append(int(p))
    return labels


def var_loaded(pipe: Any, name: str, tiny: bool) -> LoadedPipeline:
    """A :class:`LoadedPipeline` for a :class:`~diffusers_attn.pipelines.var.VARPipeline`: the "prompt" is the
    class-label text, validated against the model's number of classes."""
    num_classes = int(pipe.transformer.config.num_classes)

    def prompt_kwargs(text: str, negative_prompt: str | None = None) -> dict[str, Any]:
        if negative_prompt:
            raise ValueError("VAR models take class labels only: leave the negative prompt empty")
        return {"class_labels": parse_class_labels(text, num_classes)}

    return LoadedPipeline(
        pipe, name, prompt_kwargs, {"guidance_scale": 4.0, "top_k": 900, "top_p": 0.95}, tiny=tiny, kind="image",
        step_module="transformer.head", decode_module="vqvae.post_quant_conv",
        num_steps=len(pipe.transformer.patch_nums),
    )


def load_var_pipeline(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedPipeline:
    """``ref-var`` (the trained reference VAR shipped with the package), ``tiny-var`` (random, built offline) or a
    folder written by ``VARPipeline.save_pretrained``. The released ``.pth`` files load with
    :meth:`VARPipeline.from_var_checkpoint`; wrap the result with :func:`var_loaded`."""
    if model in REFERENCE_VAR_MODELS:
        loaded = var_loaded(load_reference_var_pipeline(model, device, dtype), model, True)
        loaded.defaults = dict(DEFAULT_CALL)  # its 64-entry codebook: the ImageNet top_k=900 would keep every token
        loaded.default_prompt = DEFAULT_CLASS_LABELS
        return loaded
    if model in TINY_VAR_MODELS:
        pipe, tiny = build_tiny_var(seed), True
    else:
        try:
            pipe, tiny = VARPipeline.from_pretrained(model), False
        except Exception as e:  # noqa: BLE001 - missing folders, wrong layouts
            raise ValueError(
                f"cannot load VAR model {model!r}: {e.__class__.__name__}: {e}. Built-in offline VAR models: "
                f"{', '.join((*REFERENCE_VAR_MODELS, *TINY_VAR_MODELS))}; a folder from VARPipeline.save_pretrained "
                "also works (the released "
                ".pth files: VARPipeline.from_var_checkpoint(vae, var, depth) then save_pretrained)"
            ) from None
        pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype)
    return var_loaded(pipe, model, tiny)


def run_comparison(
    loaded: LoadedPipeline,
    apply_fn: Callable[[Any], None],
    *,
    method_name: str,
    prompt: str,
    negative_prompt: str | None,
    call_kwargs: dict[str, Any],
    seed: int,
    device: torch.device,
    warmup: bool = True,
    note: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    remove_fn: Callable[[Any], Any] | None = None,
    repeats: int = 1,
    on_phase: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """Run dense then accelerated with the same seed, each ``repeats`` times (times are medians; the frames are
    the first run's); the accelerated attention is removed afterwards (``remove_fn``, default
    :func:`~diffusers_attn.install.remove_attention_acceleration`; LiteVAR passes ``remove_litevar``).

    ``progress(phase, done, total)`` reports steps of each phase (``warm-up``, ``dense``, the method name);
    ``on_phase(text)`` is called as each phase starts (and before the metrics).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    pipe = loaded.pipe
    kwargs = {**loaded.prompt_kwargs(prompt, negative_prompt), **call_kwargs}
    # VAR has a fixed number of scales: its warm-up is a full run.
    warm_kwargs = {**kwargs, "num_inference_steps": 1} if "num_inference_steps" in kwargs else dict(kwargs)
    extra = dict(step_module=loaded.step_module, decode_module=loaded.decode_module, num_steps=loaded.num_steps,
                 all_images=loaded.kind == "image")
    phase = on_phase or (lambda _text: None)

    def tick(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    def arm(name: str) -> RunResult:
        if warmup:
            phase(f"warm-up run ({name}, 1 step)")
            generate(pipe, warm_kwargs, seed, device, on_step=tick(f"warm-up ({name})"), **extra)
        runs = []
        for i in range(repeats):
            phase(f"{name} run" + (f" {i + 1}/{repeats}" if repeats > 1 else ""))
            runs.append(generate(pipe, kwargs, seed, device, on_step=tick(name), **extra))
        return _median_run(runs)

    dense = arm("dense")
    try:
        apply_fn(pipe)
        accel = arm(method_name)
        stats = get_attention_stats(pipe, log=False)
    finally:
        (remove_fn or remove_attention_acceleration)(pipe)
    phase("metrics (PSNR, SSIM)")
    per_frame, identical = finite_mean(psnr_frames(dense.frames, accel.frames))
    settings = {
        "model": loaded.name,
        "transformer": type(pipe.transformer).__name__,
        "method": method_name,
        "seed": seed,
        "device": str(device),
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        "warmup": warmup,
        "repeats": repeats,
        "note": note,
        **{k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str))},
    }
    return ComparisonResult(
        dense=dense,
        accelerated=accel,
        psnr_db=psnr(dense.frames, accel.frames),
        psnr_per_frame_db=per_frame,
        identical_frames=identical,
        ssim=ssim(dense.frames, accel.frames),
        stats=stats,
        settings=settings,
        speedup_withheld=speedup_withheld(stats, loaded.tiny),
    )


def format_psnr(db: float) -> str:
    return "inf (identical)" if math.isinf(db) else f"{db:.2f} dB"


def _median_run(runs: list[RunResult]) -> RunResult:
    totals, denoises = [r.total_s for r in runs], [r.denoise_s for r in runs]
    return RunResult(frames=runs[0].frames, total_s=statistics.median(totals), denoise_s=statistics.median(denoises),
                     total_times=totals, denoise_times=denoises)


def speedup_withheld(stats: AttentionStats, small_model: bool) -> str | None:
    """Why a timing ratio would not be a speedup: nothing ran sparse (every call or head dense), or the model is
    one of the built-in small ones, whose runs time overheads rather than attention. ``None``: report it."""
    if stats.calls == 0 or stats.video_density >= 1.0 - 1e-9:
        return ("nothing ran sparse (executed video density 1.000: sparsity 0, or every call/head dense); "
                "the two timings differ only by noise")
    if small_model:
        return ("the built-in tiny/reference models are too small for timings to measure attention speed "
                "(they time overheads); use a real model on a GPU")
    return None
