"""Hub ids, said in one line when they cannot load: a missing local path, the Hub unreachable or offline.

``huggingface_hub`` retries a failed request five times with a warning each (about 30 s and a screen of
warnings when the machine is offline); :func:`check_hub_model` finds the common cases first, and
:func:`quiet_hub` keeps the retry warnings out of the console while a config is fetched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from typing import Iterator
from urllib.parse import urlparse


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:  # noqa: BLE001 - an old or missing huggingface_hub: the public endpoint
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _cached(model: str, filename: str = "model_index.json") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is reported by the loader
        return False


def _reachable(url: str, timeout: float = 3.0) -> str | None:
    """``None`` when a TCP connection to the endpoint opens (or a proxy is set), else the reason."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy decides; the loader reports what it says
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "", u.port or (443 if u.scheme == "https" else 80)), timeout):
            return None
    except OSError as e:
        return f"{e.__class__.__name__}: {e.strerror or e}"


def check_hub_model(model: str, builtin: tuple[str, ...] = ()) -> None:
    """``ValueError`` (one line) when ``model`` (not an existing folder) cannot come from the Hub: offline mode
    without a cached copy, or the endpoint unreachable. Does nothing for a folder or a cached id."""
    if os.path.isdir(os.path.expanduser(model)):
        return
    hint = f" Built-in offline models: {', '.join(builtin)}." if builtin else ""
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ValueError(f"cannot load model {model!r}: the path does not exist.{hint}")
    if _cached(model):
        return
    if _offline():
        raise ValueError(f"cannot load model {model!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         f"download it first or pass a local folder.{hint}")
    endpoint = _endpoint()
    why = _reachable(endpoint)
    if why is not None:
        raise ValueError(f"cannot load model {model!r}: it is not in the local Hugging Face cache and {endpoint} cannot be "
                         f"reached ({why}); pass a local folder or connect.{hint}")


@contextlib.contextmanager
def quiet_hub(verbose: bool = False) -> Iterator[None]:
    """Hide huggingface_hub's per-retry warnings and deprecation chatter (the error itself still surfaces)."""
    if verbose:
        yield
        return
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        log.setLevel(level)
