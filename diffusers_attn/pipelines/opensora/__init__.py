"""Open-Sora 2.0 (hpcaitech) in diffusers form: transformer, converter and pipeline."""

from .convert import (
    OpenSoraConversionError,
    convert_hunyuan_vae,
    convert_opensora_checkpoint,
    convert_opensora_v2_to_diffusers,
    transformer_from_original,
)
from .transformer import OpenSoraTransformer3DModel

__all__ = [
    "OpenSoraConversionError",
    "OpenSoraTransformer3DModel",
    "convert_hunyuan_vae",
    "convert_opensora_checkpoint",
    "convert_opensora_v2_to_diffusers",
    "transformer_from_original",
]

from .pipeline import OpenSoraPipeline, OpenSoraPipelineOutput  # noqa: E402

__all__ += ["OpenSoraPipeline", "OpenSoraPipelineOutput"]
