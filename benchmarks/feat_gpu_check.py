"""GPU correctness of the Bi-WKV Triton kernel at real sizes (forward and backward) before timing it.

    python benchmarks/feat_gpu_check.py            # CUDA; exits non-zero on any failure
    TRITON_INTERPRET=1 python benchmarks/feat_gpu_check.py --smoke   # CPU script check (tiny shapes)

Reference: the exact chunked PyTorch form in float64 (itself tested against the O(T^2) definition). Cases cover
one chunk and many chunks, T-normalised (FEAT) and local (processor) decays of both signs, fp32/fp16/bf16 inputs.
Tolerances on relative L2 error: fp32 1e-4 (long fp32 sums), fp16 5e-3, bf16 2e-2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from diffusers_attn.kernels.biwkv import biwkv_chunked
from diffusers_attn.kernels.biwkv_triton import biwkv_triton

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def case(B, T, C, decay, normalise, dtype, device, chunk):
    g = torch.Generator().manual_seed(T + C)
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    w = torch.randn(C, generator=g) * decay / (T if normalise else 1)
    u = torch.randn(C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    ours = [x.to(device, dtype).clone().requires_grad_() for x in (k, v)] + \
           [x.to(device).clone().requires_grad_() for x in (w, u)]
    y = biwkv_triton(*ours, chunk=chunk)
    (y.float() * gy.to(device)).sum().backward()
    ref = [x.to(dtype).double().clone().requires_grad_() for x in (k, v)]
    ref += [x.double().clone().requires_grad_() for x in (w, u)]
    yr = biwkv_chunked(*ref, chunk=64)
    (yr * gy.double()).sum().backward()
    errs = {"y": rel(y.cpu(), yr.detach())}
    for name, a, b in zip("kvwu", ours, ref):
        errs["d" + name] = rel(a.grad.cpu(), b.grad)
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --smoke with TRITON_INTERPRET=1 for a script check)")
    if args.smoke:
        cases = [(1, 40, 20, 5.0, True, 8), (1, 30, 16, 1.0, False, 7)]
    else:
        cases = [(2, 4096, 512, 5.0, True, 256), (1, 16384, 256, 30.0, True, 256), (4, 80, 3072, 1.0, False, 256),
                 (1, 32768, 128, -0.05, False, 256), (1, 5000, 96, 0.5, False, 128)]
    failed = 0
    for B, T, C, decay, normalise, chunk in cases:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if args.smoke and dtype == torch.bfloat16:
                continue
            errs = case(B, T, C, decay, normalise, dtype, device, chunk)
            ok = all(e <= TOL[dtype] * (5 if n != "y" else 1) for n, e in errs.items())
            failed += not ok
            tag = f"B={B} T={T} C={C} decay={decay}{'/T' if normalise else ''} chunk={chunk}"
            print(f"{'ok  ' if ok else 'FAIL'} {tag} "
                  f"{str(dtype)[6:]}: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()), flush=True)
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
