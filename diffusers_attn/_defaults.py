"""Defaults shared by the library and the command line, importable without torch (``diffusers-attn --help``)."""

#: RainFusion's default sparsity: the share of video x video (query, key) pairs skipped
DEFAULT_SPARSITY = 0.64
#: RainFusion modes: per-head v1 patterns chosen by ARM, or RainFusion 2.0 block top-k
RAINFUSION_MODES = ("rf1", "rf2")
DEFAULT_MODE = "rf1"
#: the built-in offline models by name (the lists live with their builders; tests keep these in step)
VIDEO_BUILTIN_MODELS = ("ref-cogvideox", "ref-hunyuan", "tiny-cogvideox", "tiny-cogvideox-1.5", "tiny-hunyuan",
                        "tiny-opensora", "tiny-wan", "tiny-wan2.2", "tiny-hunyuanvideo-1.5")
VAR_BUILTIN_MODELS = ("ref-var", "tiny-var")
#: RainFusion settings for the built-in models' small latent grids (e.g. 9 x 8 x 8): no token floor and 16-token
#: blocks so the sparse path runs at all, in raster order (16-token tiles of an 8-column frame are raster runs
#: anyway, and the raster windows are the ones calibrated for these grids)
SMALL_GRID = {"min_video_tokens": 0, "block_m": 16, "block_n": 16, "token_order": "raster"}
