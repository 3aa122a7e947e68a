"""Post-training quantization for LiteVAR (LiteVAR, arXiv 2411.17178): fake-quant presets and a real int8 path on CUDA.

Fake-quant (accuracy studies only, no speed-up): asymmetric min-max, ``scale = (max - min) / divisor``,
``zp = min / scale`` (unrounded), ``q = clamp(round(x / scale - zp), 0, 2^b - 1)``, dequantized ``(q + zp) * scale``.
``divisor`` is ``2^b - 1`` by default; ``2^b`` reproduces the LiteVAR release (the top of the range clips by one
level). Weights: static per output channel. Linear inputs: dynamic per token.

Real int8 (CUDA only): weights int8 per output channel (symmetric), activations int8 per token (symmetric,
dynamic), ``torch._int_mm`` (int8 x int8 -> int32) and a float rescale. This is the only part of LiteVAR that can
cut latency and weight memory.

Both are installed by swapping the class of existing ``nn.Linear`` modules (parameter names unchanged for
fake-quant), so no module tree is rebuilt and nothing is patched globally.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# preset -> (weight bits, activation bits, attention bits or None for 16-bit attention)
QUANT_PRESETS: dict[str, tuple[int, int, int | None]] = {
    "w8a8": (8, 8, 8),
    "w6a6": (6, 6, 8),
    "w4a8": (4, 8, 8),
    "w4a6": (4, 6, 8),
    "w4a4": (4, 4, 8),
    "w8a8_fp16attn": (8, 8, None),
}
REAL_QUANT = ("int8",)


def fake_quant(x: torch.Tensor, bits: int, dim: int | tuple[int, ...], parity_divisor: bool = False) -> torch.Tensor:
    """Asymmetric min-max fake quantization of ``x`` with statistics reduced over ``dim`` (computed in fp32)."""
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    mx = xf.amax(dim=dim, keepdim=True)
    levels = 2**bits
    scale = ((mx - mn) / (levels if parity_divisor else levels - 1)).clamp_min(1e-12)
    zp = mn / scale
    q = (xf / scale - zp).round().clamp(0, levels - 1)
    return ((q + zp) * scale).to(x.dtype)


def fake_quant_probs(p: torch.Tensor, bits: int, parity_divisor: bool = False) -> torch.Tensor:
    """Static quantization of softmax probabilities: zp 0, scale 1/(2^b - 1) (1/2^b for parity)."""
    levels = 2**bits
    s = 1.0 / (levels if parity_divisor else levels - 1)
    return ((p.float() / s).round().clamp(0, levels - 1) * s).to(p.dtype)


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized weights (per output channel, cached) and inputs (per token)."""

    w_bits: int
    a_bits: int
    parity_divisor: bool

    def _wq(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if getattr(self, "_wq_key", None) != key:
            self._wq_cache = fake_quant(self.weight.detach(), self.w_bits, 1, self.parity_divisor)
            self._wq_key = key
        return self._wq_cache

    def forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(fake_quant(x, self.a_bits, -1, self.parity_divisor), self._wq(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_bias(x, self.bias)


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight (N, K), fp32 scale (N,))."""
    s = w.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return (w.float() / s[:, None]).round().clamp(-127, 127).to(torch.int8), s


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` with per-token int8 activations and ``torch._int_mm`` (M padded to >16 and to x8)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    sx = x2.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
    xq = (x2.float() / sx[:, None]).round().clamp(-127, 127).to(torch.int8)
    M = xq.shape[0]
    Mp = max(24, (M + 7) // 8 * 8)  # _int_mm on CUDA needs M > 16 and multiples of 8
    if Mp != M:
        xq = F.pad(xq, (0, 0, 0, Mp - M))
    wt = w_int8.t()
    try:
        acc = torch._int_mm(xq, wt)[:M]
    except RuntimeError:  # a backend that wants a row-major second operand
        acc = torch._int_mm(xq, wt.contiguous())[:M]
    out = acc.float() * sx[:, None] * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], w_int8.shape[0])


class Int8Linear(nn.Linear):
    """Real int8 linear (CUDA): the fp weight is dropped, int8 weight + scales kept as buffers. One-way."""

    def forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x, self.w_int8, self.w_scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_bias(x, self.bias)


def to_int8_linear(mod: nn.Linear) -> Int8Linear:
    """Convert ``mod`` in place to :class:`Int8Linear` (no device check: ``torch._int_mm`` also runs on CPU, which
    the tests use; ``apply_int8`` is the CUDA-only public route)."""
    wq, ws = int8_weight(mod.weight.detach())
    del mod.weight
    mod.__class__ = Int8Linear
    mod.register_buffer("w_int8", wq, persistent=False)
    mod.register_buffer("w_scale", ws, persistent=False)
    return mod  # type: ignore[return-value]


def quantizable_linears(model: nn.Module, exclude: Iterable[str]) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(name, module) of the plain ``nn.Linear`` layers to quantize, and the names left in 16 bit."""
    exclude = tuple(exclude)
    chosen, kept = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if type(mod) is Int8Linear:
            chosen.append((name, mod))  # already converted (int8 is one-way)
            continue
        if type(mod) not in (nn.Linear, FakeQuantLinear) or any(e in name for e in exclude):
            kept.append(name)  # excluded by name, or a Linear subclass with its own forward (SharedAdaLin)
            continue
        chosen.append((name, mod))
    return chosen, kept


def apply_fake_quant(model: nn.Module, w_bits: int, a_bits: int, exclude: Iterable[str],
                     parity_divisor: bool) -> tuple[list[str], list[str]]:
    chosen, kept = quantizable_linears(model, exclude)
    if any(type(m) is Int8Linear for _, m in chosen):
        raise RuntimeError("this model was converted to real int8 (one-way): reload it before fake-quantizing")
    for _, mod in chosen:
        mod.__class__ = FakeQuantLinear
        mod.w_bits, mod.a_bits, mod.parity_divisor = w_bits, a_bits, parity_divisor
        mod._wq_key = None
    return [n for n, _ in chosen], kept


def apply_int8(model: nn.Module, exclude: Iterable[str]) -> tuple[list[str], list[str]]:
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        raise RuntimeError(
            f"LiteVARConfig(quant='int8') is the real int8 path and needs the model on CUDA (torch._int_mm); the "
            f"model is on {dev}. On CPU use a fake-quant preset ({', '.join(QUANT_PRESETS)}) for accuracy studies."
        )
    chosen, kept = quantizable_linears(model, exclude)
    for name, mod in chosen:
        if type(mod) is Int8Linear:
            continue
        if mod.in_features % 8 or mod.out_features % 8:
            kept.append(name)  # _int_mm needs K and N multiples of 8
            continue
        to_int8_linear(mod)
    return [n for n, m in chosen if isinstance(m, Int8Linear)], kept


def remove_fake_quant(model: nn.Module) -> int:
    """Un-wrap fake-quant linears; returns how many real int8 layers remain (that conversion is one-way)."""
    int8 = 0
    for mod in model.modules():
        if type(mod) is FakeQuantLinear:
            mod.__class__ = nn.Linear
            for a in ("w_bits", "a_bits", "parity_divisor", "_wq_key", "_wq_cache"):
                mod.__dict__.pop(a, None)
        elif type(mod) is Int8Linear:
            int8 += 1
    return int8
