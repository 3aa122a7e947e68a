"""Load training checkpoints (``torch.save`` of a dict) without running code from the file.

Training scripts often save the run's arguments (``argparse.Namespace``, OmegaConf ``DictConfig``, ...) next to
the weights; ``torch.load(weights_only=True)`` then refuses the whole file, and ``weights_only=False`` would let the
file call any importable function. Here torch's own ``weights_only`` unpickler does the work, and each global it
does not know is replaced by an inert placeholder class (never imported, never called): tensors, containers and
numbers load as usual, the foreign objects come back as :class:`UnknownObject` instances that hold their pickled
arguments and state as plain data. Globals from ``os``/``sys`` stay refused by torch.
"""

from __future__ import annotations

import os
from typing import Any

import torch


class UnknownObject:
    """Placeholder for an object of a class the checkpoint names but that is not loaded (``_pickled_name``)."""

    _pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> UnknownObject:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # called for REDUCE; keeps nothing else
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<not loaded: {self._pickled_name}>"


def _placeholder(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (UnknownObject,), {"__module__": module, "__qualname__": name, "_pickled_name": full_name})


def load_checkpoint_without_code(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` that tolerates unknown globals by loading them as placeholders."""
    if not (hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
            and hasattr(torch.serialization, "safe_globals")):
        raise RuntimeError("loading checkpoints with non-tensor entries needs torch 2.6 or later (tested: 2.13)")
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format): let torch.load name the problem
        unknown = []
    stubs = [(_placeholder(g), g) for g in unknown]
    with torch.serialization.safe_globals(stubs):
        return torch.load(path, map_location="cpu", weights_only=True)
