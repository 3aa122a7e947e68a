"""TokenLayout: where video and text sit in a joint attention sequence.

This is the only description of a model that attention methods see. Video tokens are in (t, h, w) raster order
starting at ``video_offset``; text tokens occupy ``[text_offset, text_offset + text_len)``. Key padding (e.g.
HunyuanVideo's padded prompt) is carried separately as a per-call boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenLayout:
    """Geometry of one attention call's sequence (hashable; used as a cache key for plans)."""

    frames: int  # T, post-patch latent frames
    height: int  # H, post-patch latent rows
    width: int  # W, post-patch latent columns
    video_offset: int
    text_offset: int
    text_len: int

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
        import torch

        pos = torch.arange(self.seq_len)
        rel = pos - self.video_offset
        vid = (rel >= 0) & (rel < self.num_video)
        hw = self.frame_tokens
        t = torch.where(vid, rel // hw, -1)
        h = torch.where(vid, (rel % hw) // self.width, -1)
        w = torch.where(vid, rel % self.width, -1)
        txt = (pos >= self.text_offset) & (pos < self.text_offset + self.text_len)
        return t, h, w, txt

    @classmethod
    def text_first(cls, grid: tuple[int, int, int], text_len: int) -> "TokenLayout":
        """[text, video] as in CogVideoX and Open-Sora 2.0."""
        T, H, W = grid
        return cls(T, H, W, video_offset=text_len, text_offset=0, text_len=text_len)

    @classmethod
    def video_first(cls, grid: tuple[int, int, int], text_len: int) -> "TokenLayout":
        """[video, text] as in HunyuanVideo."""
        T, H, W = grid
        return cls(T, H, W, video_offset=0, text_offset=T * H * W, text_len=text_len)


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
