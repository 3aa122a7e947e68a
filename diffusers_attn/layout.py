"""TokenLayout: where video and text sit in a joint attention sequence.

This is the only description of a model that attention methods see. Video tokens start at ``video_offset``, in
(t, h, w) raster order, or, with ``order=(tt, th, tw)``, with the first latent frame in raster order followed by the
frames t >= 1 in spatio-temporal tiles of tt x th x tw tokens (tile by tile, raster inside a tile; edge tiles are
smaller), so that a block of consecutive tokens is a compact 3-D window. Text tokens occupy ``[text_offset,
text_offset + text_len)``. Key padding (e.g. HunyuanVideo's padded prompt) is carried separately as a per-call
boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=64)
def tile_permutation(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """``perm`` (T*H*W,) int64: the raster index of the video token at each position of the tiled order.

    The first frame keeps its raster positions (models address it by position, e.g. HunyuanVideo's I2V token
    replacement); frames t >= 1 are ordered tile by tile (tiles of ``tile`` = (tt, th, tw) starting at t = 1, row-major
    over (tile t, tile row, tile column)), raster inside a tile."""
    T, H, W = grid
    tt, th, tw = tile
    if min(tile) < 1:
        raise ValueError(f"tile sizes must be positive, got {tile}")
    t = torch.arange(1, T).view(-1, 1, 1).expand(T - 1, H, W)
    h = torch.arange(H).view(1, -1, 1).expand(T - 1, H, W)
    w = torch.arange(W).view(1, 1, -1).expand(T - 1, H, W)
    ht, wt = -(-H // th), -(-W // tw)
    tile_id = (((t - 1) // tt) * ht + h // th) * wt + w // tw
    inner = (((t - 1) % tt) * th + h % th) * tw + w % tw
    key = (tile_id * (tt * th * tw) + inner).reshape(-1)
    rest = H * W + torch.argsort(key, stable=True)
    return torch.cat([torch.arange(H * W), rest])


@dataclass(frozen=True)
class TokenLayout:
    """Geometry of one attention call's sequence (hashable; used as a cache key for plans)."""

    frames: int  # T, post-patch latent frames
    height: int  # H, post-patch latent rows
    width: int  # W, post-patch latent columns
    video_offset: int
    text_offset: int
    text_len: int
    order: tuple[int, int, int] | None = None  # tile sizes (tt, th, tw) of frames t >= 1; None = raster

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) < 1:
            raise ValueError(f"latent grid must be positive, got {(self.frames, self.height, self.width)}")
        if self.text_len < 0 or self.video_offset < 0 or self.text_offset < 0:
            raise ValueError("offsets and text length must be non-negative")
        v0, v1 = self.video_offset, self.video_offset + self.num_video
        t0, t1 = self.text_offset, self.text_offset + self.text_len
        if self.text_len and not (t1 <= v0 or v1 <= t0):
            raise ValueError(f"text range [{t0}, {t1}) overlaps video range [{v0}, {v1})")
        if self.seq_len != self.num_video + self.text_len:
            raise ValueError("video and text must tile the sequence without gaps")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def frame_tokens(self) -> int:
        """HW: tokens per latent frame."""
        return self.height * self.width

    @property
    def num_video(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return max(self.video_offset + self.num_video, self.text_offset + self.text_len)

    @property
    def sparse_rows(self) -> tuple[int, int]:
        """[start, end) of S: video queries with t >= 1, the only rows that may be sparse."""
        return (self.video_offset + self.frame_tokens, self.video_offset + self.num_video)

    @property
    def dense_row_ranges(self) -> list[tuple[int, int]]:
        """Query ranges that always attend densely: the first latent frame and the text."""
        ranges = [(self.video_offset, self.video_offset + self.frame_tokens)]
        if self.text_len:
            ranges.append((self.text_offset, self.text_offset + self.text_len))
        return sorted(ranges)

    def token_coords(self) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """``(t, h, w, is_text)`` per position of the sequence, in sequence order (int64; -1 for non-video).

        Methods locate tokens only through this (and the offsets), so a layout that orders the video tokens
        differently (e.g. in spatio-temporal tiles) changes no method code."""
        pos = torch.arange(self.seq_len)
        rel = pos - self.video_offset
        vid = (rel >= 0) & (rel < self.num_video)
        if self.order is not None:  # position -> raster index of the token there
            rel = torch.where(vid, tile_permutation(self.grid, self.order)[rel.clamp(0, self.num_video - 1)], rel)
        hw = self.frame_tokens
        t = torch.where(vid, rel // hw, -1)
        h = torch.where(vid, (rel % hw) // self.width, -1)
        w = torch.where(vid, rel % self.width, -1)
        txt = (pos >= self.text_offset) & (pos < self.text_offset + self.text_len)
        return t, h, w, txt

    @classmethod
    def text_first(cls, grid: tuple[int, int, int], text_len: int,
                   order: tuple[int, int, int] | None = None) -> "TokenLayout":
        """[text, video] as in CogVideoX and Open-Sora 2.0."""
        T, H, W = grid
        return cls(T, H, W, video_offset=text_len, text_offset=0, text_len=text_len, order=order)

    @classmethod
    def video_first(cls, grid: tuple[int, int, int], text_len: int,
                    order: tuple[int, int, int] | None = None) -> "TokenLayout":
        """[video, text] as in HunyuanVideo."""
        T, H, W = grid
        return cls(T, H, W, video_offset=0, text_offset=T * H * W, text_len=text_len, order=order)


@dataclass(frozen=True, eq=False)
class ScaleLayout:
    """One attention call of a next-scale-prediction model (VAR): queries of scale ``scale`` attend to the keys
    of scales ``0 .. scale`` (``scale`` None: a teacher-forced forward over all scales at once, with the
    block-causal additive ``attn_bias``). ``cfg_batch``: the batch is ``[cond; uncond]`` (cond first)."""

    scale: int | None
    cfg_batch: bool = False
    attn_bias: Any = None

    @property
    def teacher_forced(self) -> bool:
        return self.attn_bias is not None
