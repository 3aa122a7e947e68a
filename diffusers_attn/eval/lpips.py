"""LPIPS (Zhang et al. 2018, v0.1, AlexNet backbone) from local weight files only; never downloads.

Definition (as the ``lpips`` package and torchmetrics): inputs in [-1, 1] (we map [0, 1] frames with ``2x - 1``),
the fixed scaling layer (shift ``[-.030, -.088, -.188]``, scale ``[.458, .448, .450]``), the five ReLU outputs of
torchvision's AlexNet ``features``, each unit-normalised over channels (``x / (||x||_2 + 1e-10)``), squared
difference, the learned 1x1 linear head of that layer (no bias), spatial mean, sum over the five layers. For a
video, the per-frame values are averaged.

Weights it needs (neither ships with this package):

* the AlexNet backbone: torchvision's ``alexnet-owt-7be5be79.pth`` (``$TORCH_HOME/hub/checkpoints``, default
  ``~/.cache/torch``), or the path in ``$DIFFATTN_LPIPS_BACKBONE``;
* the v0.1 linear heads ``alex.pth``: shipped by ``torchmetrics`` and by ``lpips`` (found in their install folders
  without importing them), or the path in ``$DIFFATTN_LPIPS_HEADS``.

torchvision itself is not required. When a file is missing, :class:`LPIPSUnavailable` says which and where it was
looked for; callers report LPIPS as skipped.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._env import env_var
from .metrics import _pair

BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
HEADS_FILE = "alex.pth"
CHANNELS = (64, 192, 384, 256, 256)


class LPIPSUnavailable(RuntimeError):
    """LPIPS weights are not present locally."""


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def find_weights(backbone: str | os.PathLike | None = None,
                 heads: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the backbone and heads files; :class:`LPIPSUnavailable` lists what was tried."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    b_cands = [Path(p) for p in (backbone, env_var("LPIPS_BACKBONE")) if p]
    b_cands.append(torch_home / "hub" / "checkpoints" / BACKBONE_FILE)
    h_cands = [Path(p) for p in (heads, env_var("LPIPS_HEADS")) if p]
    for cand in (_package_file("torchmetrics", "functional", "image", "lpips_models", HEADS_FILE),
                 _package_file("lpips", "weights", "v0.1", HEADS_FILE)):
        if cand is not None:
            h_cands.append(cand)
    b = next((p for p in b_cands if p.is_file()), None)
    h = next((p for p in h_cands if p.is_file()), None)
    missing = []
    if b is None:
        missing.append(f"AlexNet backbone {BACKBONE_FILE} (looked in: {', '.join(map(str, b_cands))})")
    if h is None:
        missing.append(f"LPIPS v0.1 linear heads {HEADS_FILE} (looked in: {', '.join(map(str, h_cands)) or 'none'}; "
                       "pip install torchmetrics ships them)")
    if missing:
        raise LPIPSUnavailable("LPIPS skipped, weights not present locally: " + "; ".join(missing))
    return b, h


class AlexLPIPS(nn.Module):
    """LPIPS-Alex network; load weights with :meth:`from_files` (torchvision / lpips key names)."""

    def __init__(self) -> None:
        super().__init__()
        # torchvision.models.alexnet().features, same indices so its state dict loads as is
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )
        self.heads = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in CHANNELS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.taps = (1, 4, 7, 9, 11)  # ReLU outputs

    @classmethod
    def from_files(cls, backbone: str | os.PathLike | None = None,
                   heads: str | os.PathLike | None = None) -> "AlexLPIPS":
        b, h = find_weights(backbone, heads)
        net = cls()
        sd = torch.load(b, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        net.features.load_state_dict(feats)
        hd = torch.load(h, map_location="cpu", weights_only=True)
        for i in range(5):
            net.heads[i].data.copy_(hd[f"lin{i}.model.1.weight"])
        return net.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) distances between (N, 3, H, W) batches in [-1, 1]."""
        fx, fy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        tap = 0
        for i, layer in enumerate(self.features):
            fx, fy = layer(fx), layer(fy)
            if i in self.taps:
                nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = F.conv2d((nx - ny) ** 2, self.heads[tap])
                total = total + d.mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(self.taps):
                    break
        return total


_CACHE: dict[tuple[str, str], AlexLPIPS] = {}


def lpips(a: Any, b: Any, *, backbone: str | None = None, heads: str | None = None, device: str | None = None,
          batch: int = 8, net: AlexLPIPS | None = None) -> float:
    """Mean per-frame LPIPS-Alex between two images/videos in [0, 1] (layouts as :func:`~.metrics.psnr`)."""
    ta, tb = _pair(a, b)
    if ta.shape[1] != 3:
        raise ValueError(f"LPIPS needs RGB frames, got {ta.shape[1]} channel(s)")
    if net is None:
        key = tuple(str(p) for p in find_weights(backbone, heads))
        if key not in _CACHE:
            _CACHE[key] = AlexLPIPS.from_files(*key)
        net = _CACHE[key]
    dev = torch.device(device or "cpu")
    net = net.to(dev)
    vals = []
    with torch.no_grad():
        for i in range(0, ta.shape[0], batch):
            x = (ta[i: i + batch].float().to(dev) * 2 - 1)
            y = (tb[i: i + batch].float().to(dev) * 2 - 1)
            vals.append(net(x, y).double().cpu())
    return float(torch.cat(vals).mean())
