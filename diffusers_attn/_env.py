"""The package's environment variables: ``DIFFATTN_<NAME>``.

The former prefix ``DIFFUSERS_ATTN_`` is still read when the new name is unset, with a one-time ``FutureWarning``:
diffusers itself reads ``DIFFUSERS_ATTN_*`` variables (``DIFFUSERS_ATTN_CHECKS`` turns on its per-call attention
checks), so a shared prefix switched diffusers' behaviour too. This module imports nothing from the package, so the
lowest layers (kernels) can use it.
"""

from __future__ import annotations

import os
import warnings

PREFIX = "DIFFATTN_"
DEPRECATED_PREFIX = "DIFFUSERS_ATTN_"

_warned: set[str] = set()


def env_var(name: str, default: str | None = None) -> str | None:
    """``$DIFFATTN_<name>``; else the deprecated ``$DIFFUSERS_ATTN_<name>`` (warns once); else ``default``."""
    value = os.environ.get(PREFIX + name)
    if value is not None:
        return value
    old = DEPRECATED_PREFIX + name
    value = os.environ.get(old)
    if value is None:
        return default
    if old not in _warned:
        _warned.add(old)
        warnings.warn(
            f"{old} is deprecated: rename it to {PREFIX + name} (diffusers reads the {DEPRECATED_PREFIX} prefix "
            "for its own settings); the old name will stop working in a future release",
            FutureWarning,
            stacklevel=2,
        )
    return value


def env_flag(name: str) -> bool:
    """True when the variable (see :func:`env_var`) is ``"1"``."""
    return env_var(name, "0") == "1"
