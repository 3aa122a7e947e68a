"""Deprecated path of :mod:`diffusers_attn.methods.litevar.quant`."""

from ..methods.litevar.quant import *  # noqa: F401,F403
