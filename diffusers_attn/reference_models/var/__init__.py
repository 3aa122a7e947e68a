"""``ref-var``: a small *trained* class-conditional VAR shipped with the package (offline LiteVAR quality fixture
and the demo's default VAR model).

The project's own :class:`~diffusers_attn.pipelines.var.VQVAE` (32 px -> 8x8 latent, 64-entry codebook, scales
1, 2, 3, 4, 6, 8) and :class:`~diffusers_attn.pipelines.var.VARTransformer` (4 blocks, 4 heads x 32), trained by
:mod:`.train` on the procedural shapes of :mod:`.data` (36 classes, one image each, :data:`.data.CLASS_NAMES`).
Saved with
``VARPipeline.save_pretrained`` in ``weights/ref-var``; model card ``weights/ref-var/README.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...pipelines.var import VARPipeline
from .data import CLASS_NAMES, NUM_CLASSES

REFERENCE_VAR_MODELS = ("ref-var",)
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: Class labels the demo and CLI start with (red disc centre, green square top-left, blue triangle centre, red
#: ring bottom-right).
DEFAULT_CLASS_LABELS = "1, 12, 25, 29"
#: Sampling defaults of the reference model (vocabulary 64: the pipeline's top_k=900 keeps every token). CFG 1.0:
#: larger scales flatten this near-deterministic model's late-scale distributions (model card, guidance sweep).
DEFAULT_CALL = {"guidance_scale": 1.0, "top_k": 16, "top_p": 0.9}


def reference_var_path(name: str = "ref-var") -> Path:
    if name not in REFERENCE_VAR_MODELS:
        raise ValueError(f"unknown reference VAR model {name!r}; available: {', '.join(REFERENCE_VAR_MODELS)}")
    return WEIGHTS_DIR / name


def load_reference_var_pipeline(name: str = "ref-var", device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32):
    """The trained reference :class:`~diffusers_attn.pipelines.var.VARPipeline` (eval mode, progress bar off)."""
    folder = reference_var_path(name)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained weights for {name!r} at {folder}; train them with "
                                "`python -m diffusers_attn.reference_models.var.train`")
    pipe = VARPipeline.from_pretrained(folder)
    pipe.transformer.eval()
    pipe.vqvae.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype)
    return pipe


__all__ = ["CLASS_NAMES", "DEFAULT_CALL", "DEFAULT_CLASS_LABELS", "NUM_CLASSES", "REFERENCE_VAR_MODELS",
           "load_reference_var_pipeline", "reference_var_path"]
