"""Host work of one sparse RainFusion layer call on the GPU code path: torch ops and device-to-host reads.

Runs on a CPU: the Triton launch wrappers run as on a GPU (``TRITON_INTERPRET=1`` lets them accept CPU tensors,
the device capability is reported as sm_90 so they pick the GPU tiles), but every ``@triton.jit`` kernel is replaced
by a stub launch that does nothing, and SDPA returns an uninitialised tensor of the right shape. The probe stub
writes block masses that give the heads a mix of all four patterns (dense, spatial, temporal, textural), the
worst case for per-pattern work.

Counted per call (the second call of a layer, after plans and tables are cached), through
``diffusers_attn.adapters.processor.run_method`` (the method call plus writing its record into the stats):

* ``torch_ops_per_call``: ATen ops seen by a ``TorchDispatchMode`` (views, allocations and each kernel's output
  allocation included; a stubbed kernel launch itself is not an ATen op, an SDPA call is one).
* ``device_to_host_reads_per_call``: ``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.item()``, ``bool()``,
  ``int()``, ``float()``, ``__index__`` and ``__array__`` on a tensor (each one a synchronising read on a GPU),
  seen by a ``TorchFunctionMode``.

    python benchmarks/call_overhead.py [--json OUT] [--shapes cogvideox-5b hunyuan-720p] [--mode rf1 rf2]
        [--dense-heads kernel sdpa]

rf1 is counted for each dense-head route: ``kernel`` (dense heads in the block-sparse kernel, no host read) and
``sdpa`` (dense heads gathered into one SDPA call, one read of the decisions). The default ``dense_heads="auto"``
takes one of the two per GPU, device, dtype and shape, by timing both once (``kernels/dense_route.py``); with the
kernels stubbed here that timing would be meaningless, so ``auto`` is not a row of its own.

Shapes: CogVideoX-5B 13x30x45 video + 226 text, 48 heads x 64, batch 2 (CFG); HunyuanVideo 720p 33x45x80 + 256
text (padded: 200 valid), 24 heads x 128, batch 1; ``tiny`` for tests. bf16 inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

os.environ["TRITON_INTERPRET"] = "1"  # the launch wrappers accept CPU tensors; every kernel is stubbed below

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusers_attn.layout import TokenLayout  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]
    text_len: int
    heads: int
    head_dim: int
    batch: int
    text_first: bool
    valid_text: int | None  # valid text keys per batch element (None: no padding mask)


SHAPES = {
    "cogvideox-5b": Shape("cogvideox-5b", (13, 30, 45), 226, 48, 64, 2, True, None),
    "hunyuan-720p": Shape("hunyuan-720p", (33, 45, 80), 256, 24, 128, 1, False, 200),
    "tiny": Shape("tiny", (4, 8, 32), 16, 8, 32, 2, False, 11),
}

_SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "scaled_dot_product_attention", "_scaled_dot_product_attention_math"}
_READS = {"cpu", "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__array__"}


class OpCounter(TorchDispatchMode):
    """Counts ATen ops; SDPA returns ``torch.empty`` of its output shape (a stand-in for the GPU launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.paused:
            self.ops.append(name)
        if name in _SDPA_OPS:
            q, v = args[0], args[2]
            out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            if name == "_scaled_dot_product_attention_math" or name == "scaled_dot_product_attention":
                return out if name == "scaled_dot_product_attention" else (out, out)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            return (out, lse) + (None,) * 7 if "cpu" not in name else (out, lse)
        return func(*args, **kwargs)


class ReadCounter(TorchFunctionMode):
    """Counts tensor methods that read device memory on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.paused and args and isinstance(args[0], torch.Tensor):
            if name in _READS:
                self.reads.append(name)
            elif name == "to" and _targets_host(args[1:], kwargs):
                self.reads.append("to(cpu)")
        return func(*args, **kwargs)


def _targets_host(args, kwargs) -> bool:
    dev = kwargs.get("device", args[0] if args else None)
    return isinstance(dev, str) and dev.startswith("cpu")


class _Stub:
    """A ``@triton.jit`` kernel whose launch does nothing (or calls ``fill`` with the launch arguments)."""

    def __init__(self, fill=None) -> None:
        self.fill = fill

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.fill is not None:
                self.fill(*args)

        return launch


@contextlib.contextmanager
def stubbed_gpu_path(fill_probe=None):
    """Triton kernels stubbed, the launch wrappers told they run on sm_90."""
    import triton

    from diffusers_attn.kernels import block_select_triton, probe_triton
    from diffusers_attn.kernels import block_sparse_triton as bst

    saved = []
    for mod in (bst, probe_triton, block_select_triton):
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.KernelInterface):  # jit or interpreted functions
                saved.append((mod, attr, obj))
                setattr(mod, attr, _Stub(fill_probe if mod is probe_triton else None))
    saved.append((bst, "device_capability", bst.device_capability))
    bst.device_capability = lambda device: (9, 0)
    try:
        yield
    finally:
        for mod, attr, obj in saved:
            setattr(mod, attr, obj)


def _mixed_probe_fill(counter: OpCounter, reads: ReadCounter, member_stack):
    """Probe masses giving head h the pattern (dense, spatial, temporal, textural)[h % 4] under ARM's rule."""

    def fill(q, k, kpm, tw, mass, tmass, *rest):
        counter.paused = reads.paused = True
        try:
            _, H, P, K = mass.shape
            uniform = torch.full((P, K), 1.0 / K)
            rows = [uniform]
            for m in member_stack:  # spatial, temporal: all mass inside the executed blocks
                m = m.float()
                rows.append(m / m.sum(-1, keepdim=True).clamp_min(1))
            for h in range(H):
                which = (0, 1, 2, 0)[h % 4]
                mass[:, h] = rows[which]
                tmass[:, h] = 1.0 if h % 4 == 3 else 0.0
        finally:
            counter.paused = reads.paused = False

    return fill


def measure(shape: Shape, mode: str = "rf1", dense_heads: str | None = None, calls: int = 2) -> dict:
    """Torch ops and device-to-host reads of one steady-state sparse layer call at ``shape``."""
    from diffusers_attn.adapters.processor import run_method
    from diffusers_attn.context import AttentionContext
    from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod

    kw = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, kernel_backend="triton", mode=mode)
    if dense_heads is not None:
        kw["dense_heads"] = dense_heads
    method = RainFusionMethod(RainFusionConfig(**kw))
    make = TokenLayout.text_first if shape.text_first else TokenLayout.video_first
    layout = make(shape.grid, shape.text_len, order=method.token_order(shape.grid))
    B, H, D, N = shape.batch, shape.heads, shape.head_dim, layout.seq_len
    q, k, v = (torch.empty(B, H, N, D, dtype=torch.bfloat16).normal_() for _ in range(3))
    kpm = None
    if shape.valid_text is not None:
        kpm = torch.ones(B, N, dtype=torch.bool)
        pad = torch.arange(layout.text_offset + shape.valid_text, layout.text_offset + shape.text_len)
        kpm[:, pad] = False
    ctx = AttentionContext(adapter=None, num_inference_steps=50)
    counter, reads = OpCounter(), ReadCounter()
    members = method.plan(layout).on(q.device)["probe_member_stack"] if mode == "rf1" else None

    def dense_fn():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    per_call = []
    with stubbed_gpu_path(_mixed_probe_fill(counter, reads, members) if members is not None else None):
        for i in range(calls):
            counter.ops.clear()
            reads.reads.clear()
            with reads, counter:
                run_method(method, q, k, v, context=ctx, layout=layout, key_padding_mask=kpm, layer_index=1,
                           dense_fn=dense_fn)
            per_call.append((list(counter.ops), list(reads.reads)))
    ops, rd = per_call[-1]
    dec = ctx.last_decisions.get(1)
    patterns = None
    if dec is not None and mode == "rf1":
        import numpy as np

        patterns = sorted({int(p) for p in np.unique(dec.patterns)})
    return {
        "shape": shape.name,
        "mode": mode,
        "dense_heads": method.config.dense_heads if mode == "rf1" else None,  # rf2 has no dense heads
        "batch": B,
        "heads": H,
        "head_dim": D,
        "seq_len": N,
        "torch_ops_per_call": len(ops),
        "device_to_host_reads_per_call": len(rd),
        "reads": rd,
        "ops": ops,
        "patterns_in_call": patterns,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--shapes", nargs="+", default=["cogvideox-5b", "hunyuan-720p"], choices=sorted(SHAPES))
    ap.add_argument("--mode", nargs="+", default=["rf1", "rf2"], choices=["rf1", "rf2"])
    ap.add_argument("--dense-heads", nargs="+", default=["kernel", "sdpa"], choices=["kernel", "sdpa"],
                    help="dense-head routes counted for rf1 (auto picks one of them per GPU by timing both)")
    ap.add_argument("--ops", action="store_true", help="list the ops of each call")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.shapes:
        for mode in args.mode:
            for dh in args.dense_heads if mode == "rf1" else [None]:
                row = measure(SHAPES[name], mode, dh)
                rows.append(row)
                print(f"{row['shape']:14s} {row['mode']} dense_heads={row['dense_heads']!s:7s} "
                      f"torch ops/call {row['torch_ops_per_call']:3d}  device->host reads/call "
                      f"{row['device_to_host_reads_per_call']} {row['reads']}  patterns {row['patterns_in_call']}")
                if args.ops:
                    print("   ", " ".join(row["ops"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [{k: r[k] for k in r if k != "ops"} for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
