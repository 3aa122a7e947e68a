"""RainFusion configuration and the mapping of ``sparsity`` to pattern windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..._defaults import DEFAULT_MODE, DEFAULT_SPARSITY, RAINFUSION_MODES

DENSE, SPATIAL, TEMPORAL, TEXTURAL = 0, 1, 2, 3
PATTERN_NAMES = ("dense", "spatial", "temporal", "textural")
SPARSE_PATTERNS = {"spatial": SPATIAL, "temporal": TEMPORAL, "textural": TEXTURAL}
ARM_RULES = ("cheapest", "argmax")
MODES = RAINFUSION_MODES
DENSE_HEADS = ("auto", "sdpa", "kernel")
SKIP = 4  # table row with no key blocks: a head the same call computes elsewhere (dense heads sent to SDPA)
RF2_FIRST_FRAME = ("sink", "dense", "none")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass
class RainFusionConfig:
    """Configuration of RainFusion sparse attention.

    Args:
        sparsity: Target share of video keys skipped, in [0, 1). Maps to each pattern's window so the nominal
            video-key density is about ``1 - sparsity`` (bandwidth ``b = 1 - sqrt(sparsity)``). ``0`` runs the
            stock attention unchanged.
        dense_steps: Dense warm-up: an ``int`` number of first denoising steps, or a ``float`` fraction in [0, 1]
            of the run (rounded half up). Fractions need the total step count: from the pipeline when
            ``apply_rainfusion`` gets one, else from ``num_inference_steps``.
        dense_tail_steps: The last steps that run dense (int count or float fraction), default none.
        dense_layers: Number of first attention layers that always run dense.
        skip_layers: Extra layer indices (in installation order) that always run dense.
        arm_threshold: Recall threshold tau: a head goes sparse only with a pattern that keeps at least this share
            of the sampled attention mass; otherwise it stays dense.
        arm_rule: How ARM picks among the patterns: ``"cheapest"`` (default) takes the pattern with the lowest
            executed density among those whose recall >= ``arm_threshold`` (so ``arm_threshold=0`` always takes the
            cheapest pattern); ``"argmax"`` takes the highest recall, dense if it is below the threshold
            (``arm_threshold=0``: never dense, always the best recall). Raw recall favours patterns that execute
            more keys, so under ``"argmax"`` weakly structured heads drift to the densest sparse pattern.
        probe_budget: ARM cost as a share of the call's attention FLOPs (probe rows = ceil(2 * budget * N)).
        probe_min_rows: Minimum number of probe rows.
        arm_refresh_steps: Re-run ARM every k sparse steps (1 = every step); in between, heads keep their pattern.
        patterns: Candidate patterns for ARM, a subset of ``("spatial", "temporal", "textural")``.
        force_pattern: Skip ARM and use this pattern for every head (``"spatial"``, ``"temporal"``,
            ``"textural"`` or ``"dense"``): for ablations and debugging.
        spatial_window: Override w (frames on each side) of the spatial pattern.
        temporal_rows: Override r_h (rows on each side) of the temporal pattern.
        textural_stride: Override the stride s of the textural pattern.
        min_video_tokens: Calls with fewer video tokens run dense (reason recorded). ``0`` disables the rule.
        block_m: Query block size of the block lists.
        block_n: Key block size of the block lists.
        num_inference_steps: Total steps, for fractional ``dense_steps`` when no pipeline is available.
        kernel_backend: Force a block-sparse kernel backend (``"torch"``, ``"triton"``, ``"flex"``: PyTorch
            FlexAttention); default automatic (CUDA: Triton, else Flex where Triton cannot run the call).
        dense_heads: Where heads ARM keeps dense run on the Triton path. ``"auto"`` (default): the first call of
            each (device, dtype, head_dim, sequence length) times the kernel over all key blocks against SDPA on a
            few of its heads (milliseconds, once per process) and takes the kernel only if it measured at least as
            fast (:mod:`diffusers_attn.kernels.dense_route`); under CUDA-graph capture or ``torch.compile`` it
            takes the kernel. ``"sdpa"``: gathered into one stock SDPA call (flash / cuDNN) in the same layer call,
            which costs one read of the (B, H) decisions on the host per call (copied before the sparse kernel is
            launched, waited on after it). ``"kernel"``: in the block-sparse kernel over all key blocks; no host
            read at all (the call can be captured in a CUDA graph). The PyTorch path always uses SDPA for them.
        token_order: ``"raster"`` (the model's (t, h, w) order) or ``"tiles"``: the transformer runs the video
            tokens of frames t >= 1 in spatio-temporal tiles of ``tile`` = (tt, th, tw) tokens, permuted once where
            they are embedded and restored at the output projection (never per layer), so that each query block
            is a compact 3-D window and block lists follow the patterns instead of cutting across rows.
        tile: Tile sizes (frames, rows, columns) for ``token_order="tiles"``; default one frame of about
            sqrt(block_m / 2) rows by twice as many columns (128: ``(1, 8, 16)``):
            one frame per tile keeps the spatial pattern's blocks inside a frame, and tt * th * tw = ``block_m``
            aligns query blocks with tiles.
        mode: ``"rf1"`` (per-head Spatial / Temporal / Textural patterns chosen by ARM) or ``"rf2"`` (RainFusion
            2.0, arXiv 2512.24086: per head and call, mean-pooled q/k block scores pick the top key blocks of every
            query block so that the executed video x video density is at most ``1 - sparsity``, forced regions
            included, and short of it by less than one key block per query block).
            The ARM/pattern fields (``arm_*``, ``probe_*``, ``patterns``, windows) apply to ``rf1`` only; the
            schedule fields (``dense_*``, ``skip_layers``, ``min_video_tokens``) and block sizes apply to both.
        rf2_first_frame: How ``rf2`` treats the first latent frame: ``"sink"`` (its keys are kept for every query;
            the default), ``"dense"`` (its rows and columns are dense, as in rf1; at 13 latent frames that alone
            costs ~0.15 of the video pairs, so sparsity 0.9 cannot be met) or ``"none"`` (no special case).
            Text rows and columns are always dense.
        rf2_reuse_steps: ``rf2`` reuses each layer's block lists for this many steps (1 = select every step).
        rf2_share_layers: ``rf2`` selects once per step (first sparse layer) and reuses those lists in every layer.
    """

    sparsity: float = DEFAULT_SPARSITY
    dense_steps: int | float = 0.25
    dense_tail_steps: int | float = 0
    dense_layers: int = 1
    skip_layers: tuple[int, ...] = ()
    arm_threshold: float = 0.9
    arm_rule: str = "cheapest"
    probe_budget: float = 0.002
    probe_min_rows: int = 32
    arm_refresh_steps: int = 1
    patterns: tuple[str, ...] = ("spatial", "temporal", "textural")
    force_pattern: str | None = None
    spatial_window: int | None = None
    temporal_rows: int | None = None
    textural_stride: int | None = None
    min_video_tokens: int = 4096
    block_m: int = 128
    block_n: int = 64
    num_inference_steps: int | None = None
    kernel_backend: str | None = None
    dense_heads: str = "auto"
    token_order: str = "tiles"
    tile: tuple[int, int, int] | None = None
    mode: str = DEFAULT_MODE
    rf2_first_frame: str = "sink"
    rf2_reuse_steps: int = 1
    rf2_share_layers: bool = False

    def __post_init__(self) -> None:
        def err(msg: str) -> None:
            raise ValueError(f"RainFusionConfig: {msg}")

        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            err(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            err(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("dense_steps", "dense_tail_steps"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                err(f"{name} must be an int (steps) or a float fraction in [0, 1], got {val!r}")
            if isinstance(val, int) and val < 0:
                err(f"{name} must be >= 0, got {val}")
            if isinstance(val, float) and not 0.0 <= val <= 1.0:
                err(f"{name} as a float is a fraction of the run and must be in [0, 1], got {val}")
        for name in ("dense_layers", "probe_min_rows", "min_video_tokens"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                err(f"{name} must be an int >= 0, got {val!r}")
        if isinstance(self.arm_refresh_steps, bool) or not isinstance(self.arm_refresh_steps, int) or (
            self.arm_refresh_steps < 1
        ):
            err(f"arm_refresh_steps must be an int >= 1, got {self.arm_refresh_steps!r}")
        self.skip_layers = tuple(int(x) for x in self.skip_layers)
        if any(x < 0 for x in self.skip_layers):
            err(f"skip_layers must be non-negative layer indices, got {self.skip_layers}")
        if not 0.0 <= float(self.arm_threshold) <= 1.0:
            err(f"arm_threshold must be in [0, 1], got {self.arm_threshold}")
        if self.arm_rule not in ARM_RULES:
            err(f"arm_rule must be one of {ARM_RULES}, got {self.arm_rule!r}")
        if not 0.0 < float(self.probe_budget) <= 0.5:
            err(f"probe_budget must be in (0, 0.5], got {self.probe_budget}")
        self.patterns = tuple(self.patterns)
        bad = [p for p in self.patterns if p not in SPARSE_PATTERNS]
        if bad or not self.patterns:
            err(f"patterns must be a non-empty subset of {tuple(SPARSE_PATTERNS)}, got {self.patterns}")
        if self.force_pattern is not None and self.force_pattern not in PATTERN_NAMES:
            err(f"force_pattern must be one of {PATTERN_NAMES} or None, got {self.force_pattern!r}")
        for name, lo in (("spatial_window", 0), ("temporal_rows", 0), ("textural_stride", 1)):
            val = getattr(self, name)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < lo):
                err(f"{name} must be None or an int >= {lo}, got {val!r}")
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                err(f"{name} must be a positive int, got {val!r}")
        if self.num_inference_steps is not None and (
            not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1
        ):
            err(f"num_inference_steps must be None or a positive int, got {self.num_inference_steps!r}")
        if self.token_order not in ("raster", "tiles"):
            err(f"token_order must be 'raster' or 'tiles', got {self.token_order!r}")
        if self.tile is not None:
            self.tile = tuple(self.tile)
            if len(self.tile) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in self.tile):
                err(f"tile must be None or three positive ints (frames, rows, columns), got {self.tile!r}")
        if self.kernel_backend not in (None, "auto", "torch", "triton", "flex"):
            err(f"kernel_backend must be None, 'auto', 'torch', 'triton' or 'flex', got {self.kernel_backend!r}")
        if self.dense_heads not in DENSE_HEADS:
            err(f"dense_heads must be one of {DENSE_HEADS}, got {self.dense_heads!r}")
        if self.mode not in MODES:
            err(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.rf2_first_frame not in RF2_FIRST_FRAME:
            err(f"rf2_first_frame must be one of {RF2_FIRST_FRAME}, got {self.rf2_first_frame!r}")
        if isinstance(self.rf2_reuse_steps, bool) or not isinstance(self.rf2_reuse_steps, int) or (
            self.rf2_reuse_steps < 1
        ):
            err(f"rf2_reuse_steps must be an int >= 1, got {self.rf2_reuse_steps!r}")
        if not isinstance(self.rf2_share_layers, bool):
            err(f"rf2_share_layers must be a bool, got {self.rf2_share_layers!r}")
        if self.mode == "rf2" and self.force_pattern not in (None, "dense"):
            err(f"force_pattern={self.force_pattern!r} is an rf1 pattern; mode='rf2' accepts only None or 'dense'")

    @property
    def resolved_tile(self) -> tuple[int, int, int]:
        if self.tile is not None:
            return self.tile
        th = 1 << max(0, int(math.log2(max(self.block_m / 2, 1))) // 2)  # 128 -> 8 x 16, 64 -> 4 x 16, 16 -> 2 x 8
        return (1, th, max(1, self.block_m // th))

    def steps_from(self, value: int | float, total: int | None, what: str) -> int:
        if isinstance(value, int):
            return value
        if value in (0.0,):
            return 0
        if total is None:
            raise ValueError(
                f"RainFusionConfig.{what}={value} is a fraction of the run, but the total number of steps is "
                "unknown: pass the pipeline to apply_rainfusion, set num_inference_steps, or give an int."
            )
        return _round_half_up(value * total)


@dataclass(frozen=True)
class PatternParams:
    """Pattern windows for one latent grid: spatial w (frames), temporal r_h (rows), textural stride s.

    Tile-order plans refine them so the executed density can meet the budget: spatial also keeps the frames at
    distance w + 1 within ``edge_radius`` rows/columns of the query (-1: none); temporal limits columns to
    ``cols`` (None: every column); textural strides columns by ``stride_w`` (None: ``stride``)."""

    window: int
    rows: int
    stride: int
    edge_radius: int = -1
    cols: int | None = None
    stride_w: int | None = None

    @property
    def col_stride(self) -> int:
        return self.stride if self.stride_w is None else self.stride_w


def pattern_params(config: RainFusionConfig, grid: tuple[int, int, int]) -> PatternParams:
    """Map ``sparsity`` to pattern windows: b = 1 - sqrt(sparsity), w = round(b (T - 1)), ..."""
    T, H, _ = grid
    sigma = float(config.sparsity)
    b = 1.0 - math.sqrt(sigma)
    density = 1.0 - sigma
    w = config.spatial_window
    if w is None:
        w = min(max(_round_half_up(b * (T - 1)), 0), T - 1)
    r = config.temporal_rows
    if r is None:
        r = min(max(_round_half_up(b * (H - 1)), 0), H - 1)
    s = config.textural_stride
    if s is None:
        s = max(1, _round_half_up(1.0 / math.sqrt(density)))
    return PatternParams(window=int(w), rows=int(r), stride=int(s))

