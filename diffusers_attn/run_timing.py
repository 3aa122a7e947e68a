"""One timed generation of a pipeline (``denoise_s`` ends at the last step, ``total_s`` includes the decode)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class RunResult:
    """One arm of a comparison: frames of its first run; times are medians over ``total_times`` when repeated."""

    frames: np.ndarray  # (F, H, W, 3) float32 in [0, 1]
    total_s: float
    denoise_s: float
    total_times: list[float] = field(default_factory=list)  # every timed run (repeats), seconds
    denoise_times: list[float] = field(default_factory=list)

    @property
    def spread(self) -> str:
        """"1.20-1.31 s over 3 runs" ("1 run" when not repeated)."""
        t = self.total_times or [self.total_s]
        return f"{min(t):.3f}-{max(t):.3f} s over {len(t)} runs" if len(t) > 1 else "1 run"


def _accepts(pipe: Any, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _decode_module(pipe: Any) -> str | None:
    """Where decoding starts, for video pipelines without ``callback_on_step_end`` (HunyuanVideo-1.5)."""
    if _accepts(pipe, "callback_on_step_end"):
        return None
    return "vae.decoder" if isinstance(getattr(getattr(pipe, "vae", None), "decoder", None), torch.nn.Module) else None


def _guidance_to_guider(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pipelines that take ``guidance_scale`` from their guider (HunyuanVideo-1.5), not from ``__call__``: set it
    there."""
    if "guidance_scale" in kwargs and not _accepts(pipe, "guidance_scale") and getattr(pipe, "guider", None):
        kwargs = dict(kwargs)
        pipe.guider = pipe.guider.new(guidance_scale=kwargs.pop("guidance_scale"))
    return kwargs


def generate(
    pipe: Any,
    kwargs: dict[str, Any],
    seed: int,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
    *,
    step_module: str | None = None,
    decode_module: str | None = None,
    num_steps: int | None = None,
    all_images: bool = False,
) -> RunResult:
    """One timed generation; ``denoise_s`` ends at the last step's callback (before VAE decode).

    ``on_step(done, total)`` is called after each denoising step (progress bars; outside the timed region's
    synchronisation point but inside the run, so keep it cheap). Pipelines without ``callback_on_step_end``
    (VAR) mark steps by calls of ``step_module`` and the end of sampling by the first call of ``decode_module``.
    ``all_images``: keep every image of the batch as a frame (VAR: one per class label) instead of the first.
    """
    marks: list[float] = []
    total_steps = int(kwargs.get("num_inference_steps", 0) or num_steps or 0)
    kwargs = _guidance_to_guider(pipe, kwargs)
    if not _accepts(pipe, "callback_on_step_end"):
        return _generate_hooked(pipe, kwargs, seed, device, on_step, step_module, decode_module, total_steps,
                                all_images)

    def on_step_end(_pipe, _i, _t, cb_kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        if on_step is not None:
            on_step(len(marks), total_steps)
        return cb_kwargs

    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = pipe(**kwargs, generator=gen, output_type="np", callback_on_step_end=on_step_end)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    return RunResult(frames=_frames(out, all_images), total_s=t1 - t0,
                     denoise_s=(marks[-1] - t0) if marks else t1 - t0)


def _frames(out: Any, all_images: bool) -> np.ndarray:
    frames = out.frames if hasattr(out, "frames") else out.images
    frames = np.asarray(frames if all_images else frames[0], dtype=np.float32)
    if frames.ndim == 3:
        frames = frames[None]
    return frames


def _submodule(pipe: Any, path: str) -> torch.nn.Module:
    head, _, rest = path.partition(".")
    mod = getattr(pipe, head)
    return mod.get_submodule(rest) if rest else mod


def _generate_hooked(pipe: Any, kwargs: dict[str, Any], seed: int, device: torch.device,
                     on_step: Callable[[int, int], None] | None, step_module: str | None, decode_module: str | None,
                     total_steps: int, all_images: bool) -> RunResult:
    marks: list[float] = []
    decode_at: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_step_hook(*_a: Any) -> None:
        marks.append(0.0)
        if on_step is not None:
            on_step(len(marks), total_steps)

    def on_decode(*_a: Any) -> None:
        if not decode_at:
            sync()
            decode_at.append(time.perf_counter())

    handles = []
    if step_module:
        handles.append(_submodule(pipe, step_module).register_forward_hook(on_step_hook))
    if decode_module:
        handles.append(_submodule(pipe, decode_module).register_forward_pre_hook(on_decode))
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    try:
        sync()
        t0 = time.perf_counter()
        out = pipe(**kwargs, generator=gen, output_type="np")
        sync()
        t1 = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    return RunResult(frames=_frames(out, all_images), total_s=t1 - t0,
                     denoise_s=(decode_at[0] - t0) if decode_at else t1 - t0)
