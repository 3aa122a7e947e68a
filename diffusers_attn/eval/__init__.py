"""Evaluation: paired fidelity metrics (dense vs accelerated, same seed), prompt suites, sampling, VBench."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# Imported on first use: ``diffusers-attn --help`` builds the ``eval`` parser from ``eval.cli`` and must not
# import torch through the metrics.
_EXPORTS = {
    "AlexLPIPS": ".lpips",
    "LPIPSUnavailable": ".lpips",
    "lpips": ".lpips",
    "psnr": ".metrics",
    "ssim": ".metrics",
    "to_video_tensor": ".metrics",
}

__all__ = ["AlexLPIPS", "LPIPSUnavailable", "lpips", "psnr", "ssim", "to_video_tensor"]

if TYPE_CHECKING:
    from .lpips import AlexLPIPS, LPIPSUnavailable, lpips
    from .metrics import psnr, ssim, to_video_tensor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps ``eval.lpips`` the function, as the eager imports did: loading the submodule ``eval/lpips.py``
    (from anywhere) would otherwise bind the module object to the package attribute of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
