"""Synthetic inputs with planted attention structure (for recognizer tests and kernel benchmarks).

Random-weight models have no attention structure, so these are the honest way to exercise ARM offline: each
head's Q/K are built so its softmax mass concentrates on one pattern's key set. They say nothing about how real
models behave.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import TokenLayout

PLANTED_KINDS = ("spatial", "temporal", "textural", "random")


def planted_qkv(
    layout: TokenLayout,
    batch: int,
    kinds: list[str],
    head_dim: int = 16,
    *,
    strength: float = 12.0,
    stride: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v), each (batch, len(kinds), N, head_dim); head i follows ``kinds[i]``:

    * ``spatial``: q, k share a one-hot code of the latent frame (mass on the same frame);
    * ``temporal``: a one-hot code of the row (same row, every frame);
    * ``textural``: every query prefers the stride-``stride`` subsample of video keys;
    * ``random``: small Gaussian noise only (diffuse attention).
    """
    bad = [k for k in kinds if k not in PLANTED_KINDS]
    if bad:
        raise ValueError(f"unknown kinds {bad}; use {PLANTED_KINDS}")
    T, H, W = layout.grid
    if max(T, H) > head_dim:
        raise ValueError(f"head_dim {head_dim} too small to code {T} frames / {H} rows")
    N = layout.seq_len
    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.arange(N, device=device)
    rel = pos - layout.video_offset
    vid = (rel >= 0) & (rel < layout.num_video)
    t = torch.where(vid, rel // (H * W), 0)
    h = torch.where(vid, (rel % (H * W)) // W, 0)
    w = torch.where(vid, rel % W, 0)
    shape = (batch, len(kinds), N, head_dim)
    q = torch.empty(shape, device=device, dtype=dtype)
    k = torch.empty(shape, device=device, dtype=dtype)
    v = torch.empty(shape, device=device, dtype=dtype)
    for i, kind in enumerate(kinds):
        qi = (torch.randn(batch, N, head_dim, generator=g) * 0.1).to(device)
        ki = (torch.randn(batch, N, head_dim, generator=g) * 0.1).to(device)
        if kind == "spatial":
            code = F.one_hot(t, head_dim).float()
            qi, ki = qi + strength * code, ki + strength * code
        elif kind == "temporal":
            code = F.one_hot(h, head_dim).float()
            qi, ki = qi + strength * code, ki + strength * code
        elif kind == "textural":
            sel = ((h % stride == 0) & (w % stride == 0) & vid).float()
            qi[..., 0] += strength
            ki[..., 0] += strength * sel
        q[:, i] = qi.to(dtype)
        k[:, i] = ki.to(dtype)
        v[:, i] = torch.randn(batch, N, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k, v
