"""Side-by-side Gradio demo (``diffusers-attn demo``): dense vs an accelerated method with the same seed.

The engine (:class:`DemoRunner`) and the method registry need no Gradio; :func:`build_demo` / :func:`launch_demo`
import it when called (``pip install "diffusers-attn[demo]"``).
"""

from .app import build_demo, launch_demo
from .builtin_methods import register_builtin_methods
from .methods import METHODS, ApplyCall, DemoInputError, DemoMethod, Knob, get_method, register_method
from .runner import DemoRequest, DemoResult, DemoRunner, pattern_plot

register_builtin_methods()

__all__ = [
    "METHODS", "ApplyCall", "DemoInputError", "DemoMethod", "DemoRequest", "DemoResult", "DemoRunner", "Knob", "build_demo",
    "get_method", "launch_demo", "pattern_plot", "register_method",
]
