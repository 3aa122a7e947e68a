"""Deprecated path: :mod:`diffusers_attn.methods.litevar` (masks, config, method, calibration statistics) and
:mod:`diffusers_attn.api.litevar` (install, calibration driver)."""

from ..api.litevar import apply_litevar, begin_var_generation, calibrate_litevar, remove_litevar  # noqa: F401
from ..methods.litevar import *  # noqa: F401,F403
