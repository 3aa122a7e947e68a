"""The package's ``torch.library`` custom ops, so ``torch.compile`` sees the accelerated attention as opaque nodes
(no graph break, no per-step recompilation). Each op lives with what it runs; this module re-exports them.

* ``diffusers_attn::block_sparse_attention`` / ``::block_sparse_attention_table``: the kernel entry points
  (:mod:`diffusers_attn.kernels.compile_ops`).
* ``diffusers_attn::accelerated_attention``: a whole method call of an accelerated processor
  (:mod:`diffusers_attn.adapters.compile_op`).
* ``diffusers_attn::begin_forward``: the context hook's bookkeeping when the whole transformer is compiled; it
  returns a token every ``accelerated_attention`` call takes, which orders the calls after it
  (:mod:`diffusers_attn.context`).

Python side effects inside these ops (stats, ARM caches) run on every call, so CUDA graphs (``mode="reduce-overhead"``)
are not supported: a replayed graph would skip them.
"""

from __future__ import annotations

from .adapters.compile_op import accelerated_attention_op  # noqa: F401
from .context import begin_forward_op  # noqa: F401
from .kernels.compile_ops import block_sparse_attention_op, block_sparse_attention_table_op  # noqa: F401
