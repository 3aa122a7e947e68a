"""Resumable paired sampling of a prompt suite, dense and accelerated with the same seeds.

Layout under the output root (one folder per arm, ``dense`` and the method key)::

    manifest.json                      model, method, config, dense warm-up, seed rule, call settings, versions
    <arm>/videos/{prompt}-{i}.mp4      VBench's naming scheme (prompt verbatim), for VBench and viewing
    <arm>/frames/{prompt}-{i}.npz      lossless uint8 frames (F, H, W, 3), key "frames": fidelity is measured here
    <arm>/records/{prompt}-{i}.json    seed, timings (denoise / total), realized density: written last

A video is finished when its record exists; finished videos are never regenerated and no existing file is ever
overwritten (each file is written to a temporary name and renamed into place only where no file is). A crash
therefore loses at most the video in progress. Resuming with a different model, method, config, seeds or call
settings is refused (use a new output folder); the prompt suite and videos per prompt may grow.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import diffusers
import imageio
import numpy as np
import torch

from .. import __version__, compare  # compare.generate is looked up per call: tests patch it to simulate a crash
from ..demo.methods import DemoMethod, get_method
from ..install import get_attention_stats, remove_attention_acceleration
from ..pipelines.tiny import TINY_MODELS
from ..reference_models import REFERENCE_MODELS
from .prompts import Prompt, load_suite, video_name

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FINGERPRINT_KEYS = ("model", "method", "knobs", "method_config", "base_seed", "call_kwargs", "dtype", "timing_warmup")


@dataclass
class SampleConfig:
    """What ``diffusers-attn eval sample`` runs.

    Args:
        model: Built-in tiny model name, diffusers hub id or local folder.
        out: Output root (see the module docstring).
        suite: Prompt suite (:func:`~diffusers_attn.eval.prompts.load_suite`): ``quick``, ``all``,
            ``dimension:NAME``, ``file:PATH``.
        method: Method key from the method registry (:data:`diffusers_attn.demo.METHODS`).
        knobs: Method settings (validated by the registry entry).
        videos_per_prompt: Videos per prompt (VBench uses 5, 25 for temporal_flickering).
        seed: Base seed; video ``i`` of every prompt uses ``seed + i`` (recorded per video).
        call: Pipeline call overrides (``num_inference_steps``, ``num_frames``, ``height``, ``width``,
            ``guidance_scale``).
        limit: Only the first N prompts of the suite.
        warmup: One 1-step run per arm before the first timed video (Triton autotune, compile, allocator).
    """

    model: str
    out: Path
    suite: str = "quick"
    method: str = "rainfusion"
    knobs: dict[str, Any] = field(default_factory=dict)
    videos_per_prompt: int = 1
    seed: int = 0
    call: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    warmup: bool = True
    device: str | None = None
    dtype: str | None = "auto"
    fps: int = 8


def _atomic_write(path: Path, write: Callable[[Path], None]) -> bool:
    """Write via a temporary file in the same folder and rename into place unless ``path`` exists."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        if path.exists():  # appeared meanwhile: never overwrite
            return False
        os.replace(tmp_path, path)
        return True
    finally:
        tmp_path.unlink(missing_ok=True)


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_mp4(frames_u8: np.ndarray, fps: int) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        imageio.mimwrite(p, list(frames_u8), fps=fps, macro_block_size=16, format="FFMPEG")

    return write


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "diffusers_attn": __version__}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SampleSummary:
    root: Path
    generated: int
    skipped: int
    arms: tuple[str, str]
    prompts: int


def sample(cfg: SampleConfig, *, loader: Callable[..., Any] | None = None,
           log: Callable[[str], None] = print) -> SampleSummary:
    """Generate the missing videos of ``cfg`` (see the module docstring)."""
    method = _evaluable_method(cfg.method)
    knobs = method.validate_knobs(cfg.knobs)
    if cfg.videos_per_prompt < 1:
        raise ValueError(f"videos_per_prompt must be >= 1, got {cfg.videos_per_prompt}")
    prompts: list[Prompt] = load_suite(cfg.suite)[: cfg.limit] if cfg.limit else load_suite(cfg.suite)
    prompts = list({p.text: p for p in prompts}.values())  # VBench's list repeats two prompts; one video set each
    names = [(p, i, video_name(p.text, i)) for p in prompts for i in range(cfg.videos_per_prompt)]  # check first
    root = Path(cfg.out)
    arms = ("dense", method.key)
    device, dtype = compare.resolve_device_dtype(cfg.device, cfg.dtype)

    todo = [(p, i, n) for p, i, n in names if not all((root / a / "records" / f"{n}.json").exists() for a in arms)]
    skipped = len(names) - len(todo)
    # The manifest needs the loaded model's defaults (call settings); a fully finished run never loads it.
    manifest_path = root / MANIFEST
    existing = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if not todo:
        if existing is None:
            raise ValueError(f"{root}: nothing to do but no {MANIFEST}; is this a sample folder?")
        # The model is not loaded for a finished folder: compare what is known without it.
        _refuse_changed(root, existing, {
            "model": cfg.model, "method": method.key, "knobs": knobs, "base_seed": cfg.seed,
            "dtype": str(dtype).replace("torch.", ""), "timing_warmup": cfg.warmup,
            "call_kwargs": {**existing.get("call_kwargs", {}), **{k: v for k, v in cfg.call.items() if v is not None}},
        })
        log(f"{root}: all {len(names)} videos x {len(arms)} arms already finished with these settings")
        return SampleSummary(root, 0, skipped, arms, len(prompts))

    lp = (loader or (lambda m, d, t: compare.load_pipeline(m, d, t, seed=0)))(cfg.model, device, dtype)
    call = {**lp.defaults, **{k: v for k, v in cfg.call.items() if v is not None}}
    call.setdefault("num_inference_steps", 50)
    method_config = method.describe(knobs, lp) if method.describe else knobs
    manifest = _manifest(cfg, lp, method.key, knobs, method_config, call, device, dtype, arms)
    _check_or_write_manifest(root, manifest, existing)

    apply_fn = method.make_apply(knobs, lp)
    warmed: set[str] = set()
    generated = 0
    for k, (prompt, index, name) in enumerate(todo):
        kwargs = {**lp.prompt_kwargs(prompt.text, None), **call}
        for arm in arms:
            if (root / arm / "records" / f"{name}.json").exists():
                continue
            warmup = cfg.warmup and arm not in warmed
            _sample_arm(root, arm, lp, apply_fn if arm != "dense" else None, kwargs, prompt, index, name,
                        cfg.seed + index, device, warmup, cfg.fps)
            warmed.add(arm)
            generated += 1
        log(f"[{skipped + k + 1}/{len(names)}] {name}")
    return SampleSummary(root, generated, skipped, arms, len(prompts))


def _evaluable_method(key: str) -> DemoMethod:
    """The registry entry ``key``, refused when it cannot run a text prompt suite as it is."""
    method = get_method(key)
    if method.conditioning != "prompt":
        raise ValueError(f"method {key!r} is class-conditioned; eval sample runs text prompt suites")
    if method.wants_call:
        raise ValueError(f"method {key!r} prepares on each demo request (FEAT: a short distillation on the "
                         "request's own prompt), which an evaluation must not do; evaluate a distilled FEAT adapter "
                         "from Python (apply_feat + load_feat_adapter) instead")
    return method


def _manifest(cfg: SampleConfig, lp: Any, method_key: str, knobs: dict[str, Any], method_config: dict[str, Any],
              call: dict[str, Any], device: torch.device, dtype: torch.dtype, arms: tuple[str, str]) -> dict[str, Any]:
    return {
        "format": 1,
        "model": cfg.model,
        "tiny_random_weights": cfg.model in TINY_MODELS,
        "reference_model": cfg.model in REFERENCE_MODELS,  # trained offline on procedural clips, not a real model
        "transformer": type(lp.pipe.transformer).__name__,
        "method": method_key,
        "knobs": knobs,
        "method_config": method_config,
        "dense_warmup": {k: method_config[k] for k in ("dense_steps", "dense_tail_steps", "dense_layers",
                                                      "skip_layers") if k in method_config},
        "base_seed": cfg.seed,
        "seed_rule": "video i of every prompt uses base_seed + i; dense and accelerated share it",
        "call_kwargs": {k: v for k, v in call.items() if isinstance(v, (int, float, str, bool))},
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "timing_warmup": cfg.warmup,
        "timing": "denoise_s ends at the last step callback, total_s includes VAE decode; "
                  "a 1-step warm-up per arm and process is excluded" if cfg.warmup else "no warm-up run",
        "frames": "lossless uint8 npz (F, H, W, 3), key 'frames'; mp4 for VBench/viewing only",
        "naming": "VBench: {prompt}-{index}.mp4",
        "suite": cfg.suite,
        "videos_per_prompt": cfg.videos_per_prompt,
        "arms": list(arms),
        "versions": _versions(),
        "created": _now(),
    }


def _check_or_write_manifest(root: Path, manifest: dict[str, Any], existing: dict[str, Any] | None) -> None:
    """A resumed run must match what was sampled (:data:`FINGERPRINT_KEYS`); a new one writes its manifest."""
    if existing is not None:
        _refuse_changed(root, existing, {k: manifest.get(k) for k in FINGERPRINT_KEYS})
    else:
        root.mkdir(parents=True, exist_ok=True)
        _atomic_write(root / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2, default=str)))


def _refuse_changed(root: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """``ValueError`` naming each setting in ``wanted`` that differs from the folder's manifest."""
    same = lambda a, b: json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)  # noqa: E731
    diff = [f"{k}: {existing.get(k)!r} -> {v!r}" for k, v in wanted.items() if not same(existing.get(k), v)]
    if diff:
        raise ValueError(f"{root} was sampled with other settings ({'; '.join(diff)}); use a new --out folder "
                         "(finished videos are never overwritten)")


def _sample_arm(root: Path, arm: str, lp: Any, apply_fn: Callable[[Any], Any] | None, kwargs: dict[str, Any],
                prompt: Prompt, index: int, name: str, seed: int, device: torch.device, warmup: bool,
                fps: int) -> None:
    """One video of one arm (``apply_fn`` installs the method; ``None``: dense): frames, mp4, then the record."""
    if apply_fn is not None:
        apply_fn(lp.pipe)
    try:
        if warmup:
            compare.generate(lp.pipe, {**kwargs, "num_inference_steps": 1}, seed, device)
        res = compare.generate(lp.pipe, kwargs, seed, device)
        stats = get_attention_stats(lp.pipe, log=False) if apply_fn is not None else None
    finally:
        if apply_fn is not None:
            remove_attention_acceleration(lp.pipe)
    u8 = _to_uint8(res.frames)
    _atomic_write(root / arm / "frames" / f"{name}.npz", lambda p: np.savez_compressed(p, frames=u8))
    _atomic_write(root / arm / "videos" / f"{name}.mp4", _write_mp4(u8, fps))
    record = {
        "name": name, "prompt": prompt.text, "index": index, "seed": seed, "arm": arm,
        "dimensions": list(prompt.dimensions), "total_s": res.total_s, "denoise_s": res.denoise_s,
        "frames_shape": list(u8.shape), "device": str(device),
        "density": stats.density if stats else 1.0,
        "video_density": stats.video_density if stats else 1.0,
        "pattern_histogram": stats.pattern_histogram if stats else {},
        "dense_fallbacks": stats.dense_fallbacks if stats else {},
        "finished": _now(),
    }
    _atomic_write(root / arm / "records" / f"{name}.json", lambda p: p.write_text(json.dumps(record, indent=2)))
