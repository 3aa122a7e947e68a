"""Attention methods (what to compute): one subpackage per method, model-agnostic.

A method sees q, k, v (B, H, N, D), a layout descriptor and a :class:`~diffusers_attn.methods.base.CallInfo`,
and returns its output with a :class:`~diffusers_attn.methods.base.MethodRecord`. It never imports a model, an
adapter or the install layer.
"""

from .base import AttentionMethod, CallInfo, MethodRecord

__all__ = ["AttentionMethod", "CallInfo", "MethodRecord"]
