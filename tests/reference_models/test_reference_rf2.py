"""RainFusion 2.0 (mode="rf2") on the trained reference models: a sanity floor on fidelity vs dense (same seed).

Measured with ``python benchmarks/rf2_reference_quality.py`` (6 prompts, library schedule defaults, 16-token
blocks): sparsity 0.6 gives 29.2 dB mean / 27.4 worst (ref-cogvideox) and 23.8 / 21.6 (ref-hunyuan) at a whole-run
video density of ~0.65. The floor below only catches a broken selection, not a quality regression of a few dB.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_attn.reference_models import REFERENCE_MODELS, load_reference_pipeline
from diffusers_attn.reference_models.quality import fidelity_sweep

PROMPT = "red square moves right over checker"


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_rf2_fidelity_sanity_floor(name):
    torch.set_num_threads(1)
    spec = load_reference_pipeline(name)
    cache: dict = {}
    (low, high) = fidelity_sweep(spec, [0.6, 0.9], [PROMPT], dense_cache=cache, mode="rf2")
    assert low["psnr_db"] >= 18.0 and low["ssim"] >= 0.6, low
    assert low["patterns"].get("rf2", 0) > 0 and low["video_density"] < 0.7, low
    # more sparsity, less computed and less faithful (0.9 cannot be met at 9 frames: only the forced part runs)
    assert high["video_density"] < low["video_density"] and high["psnr_db"] < low["psnr_db"]
