"""Real video DiT families and their attention shapes, from frames x height x width alone (no weights).

The shape-only ``diffusers-attn plan`` report reads this registry: VAE compression, patch size, where the text
sits in the joint sequence, heads, attention layers per forward and the released default video size. Standard
library only, so the CLI can validate input and print the grid before torch loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TEXT_POSITIONS = ("first", "last", "none")


@dataclass(frozen=True)
class ModelShape:
    """One model family's attention geometry.

    ``text_position``: ``"first"`` ([text, video]), ``"last"`` ([video, text]) or ``"none"`` (video-only
    self-attention; text enters through cross-attention, which is not sparsified). ``layers``: attention calls
    over the joint sequence per transformer forward (all of them the same size).
    """

    name: str
    hub_id: str
    vae_temporal: int
    vae_spatial: int
    patch_t: int
    patch_hw: int
    text_tokens: int
    text_position: str
    heads: int
    head_dim: int
    layers: int
    default_video: tuple[int, int, int]  # frames, height, width
    layers_note: str = ""

    def __post_init__(self) -> None:
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"{self.name}: text_position must be one of {TEXT_POSITIONS}")

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (VAE downsampling times the patch)."""
        return self.vae_spatial * self.patch_hw

    @property
    def text_len(self) -> int:
        """Text tokens inside the attention sequence (0 when text is cross-attended)."""
        return 0 if self.text_position == "none" else self.text_tokens

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Post-patch ``(T, H, W)``: T = ceil(((F - 1) / vae_t + 1) / patch_t), H = h / vae_s / patch.

        The ceiling is the pipelines' padding of the latent frames to a multiple of ``patch_t`` (CogVideoX1.5:
        81 frames -> 21 latent frames -> 22 -> 11). Raises ``ValueError`` with the valid values nearby.
        """
        check_video(self, frames, height, width)
        latent_t = (frames - 1) // self.vae_temporal + 1
        p = self.pixel_multiple
        return (math.ceil(latent_t / self.patch_t), height // p, width // p)

    def describe(self, frames: int, height: int, width: int) -> list[str]:
        """Header lines of the plan report: everything known before the planner runs."""
        T, H, W = self.latent_grid(frames, height, width)
        video = T * H * W
        n = video + self.text_len
        where = {"first": "text first", "last": "video first", "none": "video-only self-attention"}
        text = f"{self.text_len:,} text" if self.text_len else "no text"
        tflop = 4.0 * n * n * self.heads * self.head_dim / 1e12  # QK^T and PV, 2 FLOP per multiply-add
        layers = f"{self.layers} attention layers" + (f" ({self.layers_note})" if self.layers_note else "")
        return [
            f"model            {self.name} ({self.hub_id}), {frames}x{height}x{width} (frames x height x width)",
            (f"latent grid      T x H x W = {T} x {H} x {W} post-patch (VAE {self.vae_temporal}x{self.vae_spatial}, "
             f"patch {self.patch_t}x{self.patch_hw}x{self.patch_hw})"),
            f"tokens           {video:,} video + {text} = {n:,} ({where[self.text_position]})",
            f"attention        {self.heads} heads x {self.head_dim}, {layers}; {tflop:.1f} TFLOP per dense call",
        ]


def _near(value: int, step: int, offset: int) -> str:
    """Three valid values around ``value`` on the lattice ``offset + k * step`` (k >= 0)."""
    k = max(round((value - offset) / step), 1)
    return ", ".join(str(offset + j * step) for j in (k - 1, k, k + 1) if offset + j * step >= 1)


def check_video(shape: ModelShape, frames: int, height: int, width: int) -> None:
    """One-line ``ValueError`` unless the video size fits the family's VAE and patch."""
    for what, val in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{shape.name}: {what} must be a positive integer, got {val!r}")
    vt = shape.vae_temporal
    if (frames - 1) % vt:
        raise ValueError(f"{shape.name}: frames must be {vt}k+1 (e.g. {_near(frames, vt, 1)}), got {frames}")
    p = shape.pixel_multiple
    for what, val in (("height", height), ("width", width)):
        if val % p:
            raise ValueError(f"{shape.name}: {what} must be a multiple of {p} (e.g. {_near(val, p, 0)}), got {val}")


# Counts from the released transformer configs (hub ``transformer/config.json``) and diffusers' defaults.
MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("cogvideox-5b", "THUDM/CogVideoX-5b", 4, 8, 1, 2, 226, "first", 48, 64, 42, (49, 480, 720)),
        ModelShape("cogvideox1.5-5b", "THUDM/CogVideoX1.5-5B", 4, 8, 2, 2, 226, "first", 48, 64, 42,
                   (81, 768, 1360)),
        ModelShape("hunyuanvideo", "hunyuanvideo-community/HunyuanVideo", 4, 8, 1, 2, 256, "last", 24, 128, 60,
                   (129, 720, 1280), layers_note="20 dual-stream + 40 single-stream"),
        # Open-Sora 2.0 decodes with the HunyuanVideo VAE (4x temporal, 8x spatial) and patchifies 2x2 in space
        # (diffusers_attn.pipelines.opensora); 768x768 is its 768px bucket at 1:1.
        ModelShape("opensora-v2", "hpcai-tech/Open-Sora-v2", 4, 8, 1, 2, 512, "first", 24, 128, 57,
                   (129, 768, 768), layers_note="19 dual-stream + 38 single-stream"),
        ModelShape("wan2.1-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 4, 8, 1, 2, 512, "none", 40, 128, 40,
                   (81, 720, 1280)),
        ModelShape("wan2.1-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 4, 8, 1, 2, 512, "none", 12, 128, 30,
                   (81, 480, 832)),
        # Wan 2.2 A14B: two experts of the 14B shape (high noise, then low noise); each forward runs one of them.
        ModelShape("wan2.2-a14b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", 4, 8, 1, 2, 512, "none", 40, 128, 40,
                   (81, 720, 1280), layers_note="per expert; two experts switched at a boundary timestep"),
        # Wan 2.2 TI2V-5B: the Wan2.2 VAE (4x16x16); its 720p is 704x1280 (multiples of 32), 121 frames.
        ModelShape("wan2.2-ti2v-5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 4, 16, 1, 2, 512, "none", 24, 128, 30,
                   (121, 704, 1280)),
        # HunyuanVideo-1.5: 16x-spatial VAE, patch 1; the conditioning tail is 1000 Qwen2.5-VL + 256 ByT5 + 729 image
        # tokens (padding and, for text-to-video, the image tokens masked but in the sequence); 121 frames at the
        # pipeline's default 16:9 size for target_size 640 / 960.
        ModelShape("hunyuanvideo-1.5-480p", "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", 4, 16, 1, 1,
                   1985, "last", 16, 128, 54, (121, 480, 848), layers_note="dual-stream"),
        ModelShape("hunyuanvideo-1.5-720p", "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v", 4, 16, 1, 1,
                   1985, "last", 16, 128, 54, (121, 720, 1280), layers_note="dual-stream"),
    )
}


def get_model_shape(name: str) -> ModelShape:
    """The registered family ``name`` (``ValueError`` naming the known ones otherwise)."""
    shape = MODEL_SHAPES.get(name)
    if shape is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_SHAPES)}")
    return shape


def resolve_video(shape: ModelShape, frames: int | None, height: int | None,
                  width: int | None) -> tuple[int, int, int]:
    """``(frames, height, width)`` with the family's defaults for those not given, validated."""
    df, dh, dw = shape.default_video
    video = (df if frames is None else frames, dh if height is None else height, dw if width is None else width)
    check_video(shape, *video)
    return video
