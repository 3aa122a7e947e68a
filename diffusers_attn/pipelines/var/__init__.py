"""VAR (next-scale prediction, FoundationVision/VAR, MIT): models and pipeline, clean-room and checkpoint-compatible."""

from .pipeline import CheckpointMismatchError, VARPipeline, VARPipelineOutput, load_official_state_dict
from .sampling import gumbel_softmax, sample_top_k_top_p, top_k_top_p_filter_
from .transformer import VARAttnProcessor, VARSelfAttention, VARTransformer
from .vqvae import VQVAE, phi_index_for_scale

__all__ = [
    "CheckpointMismatchError",
    "VARAttnProcessor",
    "VARPipeline",
    "VARPipelineOutput",
    "VARSelfAttention",
    "VARTransformer",
    "VQVAE",
    "gumbel_softmax",
    "load_official_state_dict",
    "phi_index_for_scale",
    "sample_top_k_top_p",
    "top_k_top_p_filter_",
]
