"""Deprecated path of :mod:`diffusers_attn.methods.base`."""

from ..methods.base import AttentionMethod, CallInfo, MethodRecord, dense_record, valid_key_counts  # noqa: F401
