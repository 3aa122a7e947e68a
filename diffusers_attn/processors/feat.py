"""Deprecated path: :mod:`diffusers_attn.methods.feat` (the method), :mod:`diffusers_attn.api.feat` and
:mod:`diffusers_attn.api.feat_training` (install, distill, save/load)."""

from ..api.feat import *  # noqa: F401,F403
from ..api.feat import _PROCESSORS, _processor_cls  # noqa: F401
from ..api.feat_training import *  # noqa: F401,F403
from ..api.feat_training import FEATDistillReport, LoRALinear, add_lora  # noqa: F401
from ..methods.feat import *  # noqa: F401,F403
