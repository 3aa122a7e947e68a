"""Checks of command-line arguments, run before any model loads, and outputs that replace a file only on success.

Standard library only at import time (``diffusers-attn --help`` must stay fast); the device check imports torch
when it runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

#: what imageio/ffmpeg writes for ``--out`` videos
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
DTYPE_NAMES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
# org/name on the Hugging Face Hub (letters, digits, "-", "_", "."), optionally without the org
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class UsageError(ValueError):
    """A bad command-line value: printed as one line on stderr, exit status 2."""


def check_int(name: str, value: int | None, lo: int, hi: int | None = None) -> None:
    """``--name`` in [lo, hi] (``None`` = left at its default, not checked)."""
    if value is None:
        return
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UsageError(f"--{name} must be {rng}, got {value}")


def check_float(name: str, value: float | None, lo: float, hi: float, *, hi_open: bool = False) -> None:
    if value is None:
        return
    bad = not math.isfinite(value) or value < lo or (value >= hi if hi_open else value > hi)
    if bad:
        raise UsageError(f"--{name} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value}")


def check_video_size(frames: int | None, height: int | None, width: int | None) -> None:
    """Frames >= 1; height and width positive multiples of 16 (VAE x8, then 2x2 patches)."""
    check_int("frames", frames, 1)
    for name, val in (("height", height), ("width", width)):
        check_int(name, val, 16)
        if val is not None and val % 16:
            raise UsageError(f"--{name} must be a multiple of 16, got {val}")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")


def check_device(device: str | None) -> None:
    """``--device`` names a device this torch can use (imports torch: call it after the cheap checks)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) is built without CUDA; "
                             "use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r}: supported devices are cpu and cuda (cuda:N)")


def looks_like_path(model: str) -> bool:
    """A local path rather than a hub id: absolute, relative (./, ../, ~), or more than one '/'."""
    return (model.startswith(("/", "./", "../", "~", "\\")) or model in (".", "..") or model.count("/") > 1
            or "\\" in model or os.path.exists(model))


def check_model(model: str, builtin: Iterable[str]) -> None:
    """A built-in name, an existing diffusers folder, or something shaped like a hub id (checked when loaded)."""
    names = tuple(builtin)
    if model in names:
        return
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise UsageError(f"--model {model}: the path does not exist")
        if not path.is_dir():
            raise UsageError(f"--model {model}: not a folder (a diffusers pipeline folder has model_index.json)")
        if not (path / "model_index.json").is_file():
            raise UsageError(f"--model {model}: the folder has no model_index.json, so it is not a diffusers "
                             "pipeline folder")
        return
    if "/" not in model or not _HUB_ID.match(model):
        raise UsageError(f"--model {model!r} is neither a built-in model ({', '.join(names)}), an existing "
                         "folder, nor a hub id (org/name)")


def check_out_path(flag: str, path: str | None, suffixes: tuple[str, ...] | None = None) -> None:
    """An output file path: not a folder, a known suffix, and its parent a folder (or creatable)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir() or path.endswith(("/", os.sep)):
        raise UsageError(f"--{flag} {path}: is a folder; give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"--{flag} {path}: the file name must end in one of {', '.join(suffixes)}")
    for parent in (p.parent, *p.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise UsageError(f"--{flag} {path}: cannot write in {parent}")
            break


@contextlib.contextmanager
def replace_on_success(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers pick the format by it) and move it onto
    ``path`` only when the block succeeds: a failed write never destroys an earlier file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_replacing(path: str | Path, text: str) -> Path:
    """``path`` written through :func:`replace_on_success`."""
    with replace_on_success(path) as tmp:
        tmp.write_text(text)
    return Path(path)
