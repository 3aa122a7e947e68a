"""Ahead-of-time compile check of every Triton kernel in the package, without a GPU.

Why: on CPU the tests run the kernels in the Triton interpreter (TRITON_INTERPRET=1), which accepts code the real
compiler rejects (non-constexpr Python globals, constexpr misuse, tl.dot dtype/shape rules, invalid block shapes)
and never checks resources (shared memory). This script runs the real pipeline (frontend -> TTIR -> TTGIR ->
LLVM -> PTX -> ptxas cubin, all bundled with the triton wheel) for sm_90 (H100/H200) and sm_80 (A100) targets.

How the signatures are derived (so the check cannot drift from what a GPU launches):

1. The public entry points (``block_sparse_attention``, ``block_sparse_attention_table``, ``probe_block_mass``,
   ``biwkv`` forward + backward) are called with ``backend="triton"`` on small CPU tensors whose strides look
   like real ones (multiples of 16 where a model's are, plus odd head dims / lengths).
2. ``capture_launches`` swaps each module-level ``@triton.jit`` kernel for a recorder whose ``kernel[grid](...)``
   stores the exact positional/keyword arguments the launch wrapper passes (tensors, strides, ints, constexprs,
   ``num_warps``/``num_stages``) and launches nothing. It also makes ``device_capability`` report the target GPU
   (so ``tile_config`` & co. pick the GPU tiles, not the interpreter's) and lets the "CPU tensors need the
   interpreter" gates pass. Nothing else in the wrappers is touched.
3. ``compile_launch`` turns a recorded launch into a compile with Triton's own launch-path code
   (``create_function_from_signature`` binder + ``JITFunction._pack_args``, as ``JITFunction.run`` does): the
   same pointer dtypes, int widths, ``== 1`` constexpr specialisation and 16-byte divisibility attributes as a
   real launch with those tensors, then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.
   Identical specialisations are compiled once. The compiled kernel's shared memory is checked against the
   target's per-block limit (a launch would fail with OutOfResources).
4. Every ``*_kernel`` defined in ``diffusers_attn/kernels/`` must be compiled by some case, so a new kernel
   cannot go unchecked (the capture itself patches the three Triton modules named in ``capture_launches``).

Those helpers are private Triton API: checked with triton 3.9 (the CPU venv) and 3.6 (the GPU image's version:
``pip install --no-deps --target DIR triton==3.6.0`` then ``PYTHONPATH=DIR:. python tests/_triton_compile_check.py``).
The two compilers allocate shared memory differently (3.6 took 128 KiB where 3.9 takes 96 KiB for sm_89 fp16
head_dim 128 at three stages, over that GPU's 99 KiB), so run it with both after changing a tile table.

Configurations (``cases()``: a representative subset; the full cross product would take many minutes):
* block-sparse forward, sm_90: head_dim 64/72/96/128/256 (the tile table's three bands plus the padded 72/96)
  in fp16, bf16 at 64/128/256, fp32 (IEEE dots) at 128 (225 of 227 KiB shared memory), all with RainFusion's
  128x64 lists and its compact table + key padding path; the per-head-list path with LSE, with and without key
  padding, BSHD views and contiguous tensors; 64x64 lists at N=385. sm_80 (mma v2 instead of wgmma, 163 KiB):
  fp16 64/128/256, bf16 128, fp32 128/256 (the configurations that overflowed before the fix).
* ARM probe, sm_90: fp16/bf16 at head_dim 64/128 (both warp counts), fp16 256, fp32 64, with token weights and
  key padding; P=256 without either (BLOCK_P 128, padded D=72). sm_80: fp16 128.
* Block selection (``block_topk_select``: both pooling launches and the fused selection), sm_90: bf16 at
  CogVideoX-5B (K = 278 key blocks) and HunyuanVideo 720p (K = 1861) sizes, fp16 K = 4096 (8 warps), fp16
  head_dim 256, fp32 64x64 blocks; sm_80: bf16 HunyuanVideo size.
* Bi-WKV: all six kernels (forward + backward, multi-chunk), fp32 and bf16 with delta 0/1, fp16 delta 0; sm_80
  bf16 delta 1.
* ``--full`` adds four slow fp32 compiles (block-sparse D=256 sm_90 and D=64 sm_80, probe D=256 sm_80 and D=128
  sm_90). Default set: ~50 distinct kernels, about 60 s cold on a loaded 2-core CPU (faster with a warm
  ~/.triton/cache).
* sm_89 (RTX 40xx, L4/L40S: 99 KiB per block, the same budget as sm_86 and sm_120): block-sparse fp16 64/128/256,
  bf16 128, fp32 128/256, probe fp16 128. Before the small-shared-memory rows of ``tile_config`` (2026-12-02),
  fp16 D=256 took 100 KiB and fp32 D=128 115 KiB there (OutOfResources at launch).

Run as a script without TRITON_INTERPRET (``@triton.jit`` returns interpreter objects when it is set):
``python tests/_triton_compile_check.py [--full] [block_sparse|probe|biwkv ...]``; exit code 1 if anything failed,
3 if this triton lacks the internals used (tests/test_triton_compile.py skips then).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from types import ModuleType

# Max shared memory per block (opt-in), bytes: H100/H200 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SMEM_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 9): 101376}


class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs))

        return launch


@contextlib.contextmanager
def capture_launches(capability: tuple[int, int]):
    """Record (jit_fn, args, kwargs) of every kernel launch of the package's Triton modules, as a GPU of
    ``capability`` would run them, without running anything. Yields the list the launches are appended to."""
    import triton

    from diffusers_attn.kernels import biwkv_triton, block_select_triton, block_sparse_triton, probe_triton

    mods: list[ModuleType] = [block_sparse_triton, probe_triton, biwkv_triton, block_select_triton]
    sink: list = []
    saved = []

    def patch(mod, name, value):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    try:
        for mod in mods:
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                    patch(mod, name, _Recorder(obj, sink))
        patch(block_sparse_triton, "device_capability", lambda device: capability)
        patch(block_sparse_triton, "interpreter_enabled", lambda: True)
        patch(biwkv_triton, "_interpreting", lambda: True)
        yield sink
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def package_kernels() -> list[str]:
    """Names of the launchable ``@triton.jit`` kernels (``*_kernel``; other jit functions are inlined helpers)
    defined in any module of ``diffusers_attn.kernels``."""
    import importlib
    import pkgutil

    import triton

    import diffusers_attn.kernels as pkg

    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if (isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
                    and obj.fn.__module__ == mod.__name__):
                names.append(name)
    return names


def _specialize(fn, args, kwargs, capability):
    """(target, signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def compile_launch(fn, args, kwargs, capability):
    import triton
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = _specialize(fn, args, kwargs, capability)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


# ---------------------------------------------------------------------------------------------- the real calls
def _lists(B, H, n_q, n_k, bm, bn, table: bool):
    import torch

    M, K = -(-n_q // bm), -(-n_k // bn)
    idx = torch.arange(K, dtype=torch.int32).expand(M, K)
    cnt = torch.full((M,), K, dtype=torch.int32)
    if table:  # (P, M, K) per-pattern tables, as RainFusion passes them
        return idx.expand(4, M, K).contiguous(), cnt.expand(4, M).contiguous()
    return idx.expand(B, H, M, K), cnt.expand(B, H, M)  # broadcast views, as block_mask_to_lists users pass


def bsa_call(D, dtype, *, n=512, bm=128, bn=64, table=True, kpm=True, lse=False, bshd=True):
    """One block-sparse attention call through the public dispatch (q/k/v as BSHD views when ``bshd``)."""
    import torch

    from diffusers_attn.kernels import block_sparse_attention, block_sparse_attention_table

    B, H = 1, 2
    if bshd:  # (B, N, 3, H, D) -> three (B, H, N, D) views: the diffusers processors' layout
        qkv = torch.zeros(B, n, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = (torch.zeros(B, H, n, D, dtype=dtype) for _ in range(3))
    mask = torch.ones(B, n, dtype=torch.bool) if kpm else None
    idx, cnt = _lists(B, H, n, n, bm, bn, table)
    if table:
        ht = torch.zeros(B, H, dtype=torch.int32)
        block_sparse_attention_table(q, k, v, idx, cnt, ht, block_m=bm, block_n=bn, key_padding_mask=mask,
                                     return_lse=lse, backend="triton")
    else:
        block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=mask, return_lse=lse,
                               backend="triton")


def probe_call(D, dtype, *, p=64, n=512, bn=64, kpm=True, tw=True):
    import torch

    from diffusers_attn.kernels import probe_block_mass

    B, H = 1, 2
    k = torch.zeros(B, n, H, D, dtype=dtype).transpose(1, 2)
    q = torch.zeros(B, H, n, D, dtype=dtype).index_select(2, torch.arange(p))  # gathered probe rows
    mask = torch.ones(B, n, dtype=torch.bool) if kpm else None
    weights = torch.ones(n) if tw else None
    probe_block_mass(q, k, block_n=bn, key_padding_mask=mask, token_weights=weights, backend="triton")


def select_call(D, dtype, *, n=2048, bm=128, bn=64, kpm=True):
    """block_topk_select as rf2 calls it: q and k as BSHD views of a fused QKV tensor, uint8 forced mask, fp32
    key constants (pooling of q and of k, then the fused selection)."""
    import torch

    from diffusers_attn.kernels import block_topk_select, key_blocks, num_blocks

    B, H = 1, 2
    qkv = torch.zeros(B, n, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)
    M, K = num_blocks(n, bm), num_blocks(n, bn)
    mask = torch.ones(B, n, dtype=torch.bool) if kpm else None
    block_topk_select(qkv[0], qkv[1], torch.zeros(M, K, dtype=torch.uint8), block_m=bm, block_n=bn, topk=min(4, K),
                      k_max=K, keys=key_blocks(n, bn, mask, torch.device("cpu")),
                      row_weights=torch.ones(M, 3, dtype=torch.float64), col_weights=torch.ones(K), backend="triton")


def biwkv_call(dtype, *, delta=0, T=64, C=96, chunk=16):
    """Forward and backward (T > chunk: all six kernels)."""
    import torch

    from diffusers_attn.kernels import biwkv

    k = torch.zeros(2, T, C, dtype=dtype, requires_grad=True)
    v = torch.zeros(2, T, C, dtype=dtype, requires_grad=True)
    w = torch.zeros(C, requires_grad=True)
    u = torch.zeros(C, requires_grad=True)
    biwkv(k, v, w, u, delta=delta, backend="triton", chunk=chunk).float().sum().backward()


def cases(full: bool = False):
    """(group, label, capability, thunk): the configurations checked (see the module docstring)."""
    import torch

    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    sm90, sm80, sm89 = (9, 0), (8, 0), (8, 9)
    out = []
    for D, dt in ((64, f16), (64, b16), (72, f16), (96, f16), (128, f16), (128, b16), (256, f16), (256, b16),
                  (128, f32)):
        out.append(("block_sparse", f"table+kpm D={D} {dt}", sm90, lambda D=D, dt=dt: bsa_call(D, dt)))
    out += [
        ("block_sparse", "lists+lse D=128 fp16", sm90, lambda: bsa_call(128, f16, table=False, kpm=False, lse=True)),
        ("block_sparse", "lists+kpm+lse D=64 bf16 contiguous", sm90,
         lambda: bsa_call(64, b16, table=False, lse=True, bshd=False)),
        ("block_sparse", "lists 64x64 D=96 fp16 n=77*5", sm90,
         lambda: bsa_call(96, f16, n=385, bm=64, bn=64, table=False, kpm=False)),
    ]
    for D, dt in ((64, f16), (128, f16), (256, f16), (128, b16), (128, f32), (256, f32)):
        out.append(("block_sparse", f"table+kpm D={D} {dt}", sm80, lambda D=D, dt=dt: bsa_call(D, dt)))
    # RTX 40xx / L40S class (99 KiB per block)
    for D, dt in ((64, f16), (128, f16), (256, f16), (128, b16), (128, f32), (256, f32)):
        out.append(("block_sparse", f"table+kpm D={D} {dt}", sm89, lambda D=D, dt=dt: bsa_call(D, dt)))
    for D, dt in ((64, f16), (64, b16), (64, f32), (128, f16), (128, b16), (256, f16)):
        out.append(("probe", f"tw+kpm D={D} {dt}", sm90, lambda D=D, dt=dt: probe_call(D, dt)))
    out += [
        ("probe", "P=256 plain D=72 fp16", sm90, lambda: probe_call(72, f16, p=256, kpm=False, tw=False)),
        ("probe", "tw+kpm D=128 fp16", sm80, lambda: probe_call(128, f16)),
        ("probe", "tw+kpm D=128 fp16", sm89, lambda: probe_call(128, f16)),
    ]
    # rf2's selection: CogVideoX-5B (K = 278 -> 512 padded), HunyuanVideo 720p (K = 1861 -> 2048), a longer one
    # (8 warps), head_dim 256, fp32 inputs, no padding
    out += [
        ("select", "kpm D=64 bf16 K=278", sm90, lambda: select_call(64, b16, n=17776)),
        ("select", "kpm D=128 bf16 K=1861", sm90, lambda: select_call(128, b16, n=119056)),
        ("select", "D=128 fp16 K=4096", sm90, lambda: select_call(128, f16, n=4096 * 64, kpm=False)),
        ("select", "kpm D=256 fp16", sm90, lambda: select_call(256, f16)),
        ("select", "D=64 fp32 64x64", sm90, lambda: select_call(64, f32, bm=64, kpm=False)),
        ("select", "kpm D=128 bf16 K=1861", sm80, lambda: select_call(128, b16, n=119056)),
    ]
    for dt, delta in ((f32, 0), (f32, 1), (f16, 0), (b16, 0), (b16, 1)):
        out.append(("biwkv", f"fwd+bwd {dt} delta={delta}", sm90, lambda dt=dt, d=delta: biwkv_call(dt, delta=d)))
    out.append(("biwkv", "fwd+bwd bf16 delta=1", sm80, lambda: biwkv_call(b16, delta=1)))
    if full:  # slow fp32 (IEEE dot) compiles, ~10 s each here, that fit with room to spare in triton 3.9
        out += [
            ("block_sparse", "table+kpm D=256 fp32", sm90, lambda: bsa_call(256, f32)),
            ("block_sparse", "table+kpm D=64 fp32", sm80, lambda: bsa_call(64, f32)),
            ("probe", "tw+kpm D=256 fp32", sm80, lambda: probe_call(256, f32)),
            ("probe", "tw+kpm D=128 fp32", sm90, lambda: probe_call(128, f32)),
        ]
    return out


def run(groups: list[str] | None = None, full: bool = False) -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET: the interpreter replaces @triton.jit kernels")
    import triton

    print(f"triton {triton.__version__}: ahead-of-time compile of the package's kernels (no GPU)")
    seen: dict = {}
    ok = True
    t_all = time.perf_counter()
    for group, label, cap, thunk in cases(full):
        if groups and group not in groups:
            continue
        with capture_launches(cap) as launches:
            thunk()
        if not launches:
            print(f"FAILED {group} [{label}] sm_{cap[0]}{cap[1]}: the call launched no Triton kernel")
            ok = False
        for fn, args, kwargs in launches:
            name = fn.fn.__name__
            try:
                target, sig, consts, attrs, opts = _specialize(fn, args, kwargs, cap)
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                print(f"FAILED {name} [{label}] sm_{cap[0]}{cap[1]} (specialisation): {type(e).__name__}: {e}")
                ok = False
                continue
            key = (name, cap, str(sig), str(sorted(consts.items())), str(sorted(attrs.items())),
                   opts.num_warps, opts.num_stages)
            if key in seen:
                continue
            cexp = {fn.arg_names[p[0]]: v for p, v in consts.items() if fn.params[p[0]].is_constexpr}
            desc = f"{name} [{label}] sm_{cap[0]}{cap[1]} warps={opts.num_warps} stages={opts.num_stages} {cexp}"
            t0 = time.perf_counter()
            try:
                kern = compile_launch(fn, args, kwargs, cap)
            except Exception as e:  # noqa: BLE001
                seen[key] = False
                ok = False
                print(f"FAILED {desc}: {type(e).__name__}: {str(e)[:1500]}")
                continue
            shared = kern.metadata.shared
            limit = SMEM_LIMIT[cap]
            seen[key] = shared <= limit
            status = "ok" if shared <= limit else "FAILED (shared memory over the limit)"
            ok &= shared <= limit
            print(f"{status} {desc}: shared={shared}/{limit} B, {time.perf_counter() - t0:.1f}s")
    if not groups:  # a kernel added to the package but launched by no case fails the check
        compiled = {k[0] for k, v in seen.items()}
        for name in sorted(set(package_kernels()) - compiled):
            print(f"FAILED {name}: no case launches it (add its entry point to cases())")
            ok = False
    print(f"{len(seen)} distinct kernels compiled in {time.perf_counter() - t_all:.1f}s; "
          f"{'all ok' if ok else 'FAILURES above'}")
    return ok


UNSUPPORTED = 3  # exit code: this triton lacks the launch-path internals the check reuses (the test skips)

if __name__ == "__main__":
    argv = sys.argv[1:]
    full = "--full" in argv
    argv = [a for a in argv if a != "--full"]
    try:
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        assert hasattr(JITFunction, "_pack_args")
    except (ImportError, AssertionError) as e:
        import triton

        print(f"triton {triton.__version__} lacks the launch internals this check reuses ({e!r}); checked with 3.9")
        sys.exit(UNSUPPORTED)
    sys.exit(0 if run(argv or None, full) else 1)
