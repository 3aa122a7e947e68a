"""Side-by-side Gradio demo (``diffusers-attn demo``): dense vs an accelerated method with the same seed.

The engine (:class:`DemoRunner`) and the method registry need no Gradio; :func:`build_demo` / :func:`launch_demo`
import it lazily (``pip install "diffusers-attn[demo]"``).
"""

from .methods import METHODS, ApplyCall, DemoInputError, DemoMethod, Knob, get_method, register_method
from .runner import DemoRequest, DemoResult, DemoRunner, pattern_plot


def build_demo(*args, **kwargs):
    from .app import build_demo as _build

    return _build(*args, **kwargs)


def launch_demo(*args, **kwargs):
    from .app import launch_demo as _launch

    return _launch(*args, **kwargs)


__all__ = [
    "METHODS", "ApplyCall", "DemoInputError", "DemoMethod", "DemoRequest", "DemoResult", "DemoRunner", "Knob", "build_demo",
    "get_method", "launch_demo", "pattern_plot", "register_method",
]
