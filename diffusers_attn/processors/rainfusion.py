"""Deprecated path: :mod:`diffusers_attn.methods.rainfusion` (the method) and :func:`diffusers_attn.apply_rainfusion`."""

from ..api.rainfusion import apply_rainfusion  # noqa: F401
from ..methods.rainfusion import *  # noqa: F401,F403
from ..methods.rainfusion.config import SPARSE_PATTERNS as _SPARSE_PATTERNS  # noqa: F401
