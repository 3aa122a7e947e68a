"""Inner-loop instruction count of the block-sparse kernel vs a minimal dense flash loop, from compiled code.

No GPU needed: both kernels are compiled ahead of time for sm_90 (H100/H200) and sm_80 (A100) with the triton
wheel's own toolchain (the launch-capture + ``triton.compile`` path of ``tests/_triton_compile_check.py``, so our
kernel is compiled with exactly the arguments, specialisations, tiles, warps and stages a GPU launch would use), and
the cubin is disassembled with the wheel's ``nvdisasm`` (SASS). Where ``nvdisasm`` is missing the count falls back
to PTX instructions (a weaker proxy; the output says which).

What is counted: the instructions (NOPs excluded) of the loop body that streams key tiles, i.e. every instruction
from a loop's head label to its backward branch, for the loops that contain a tensor-core instruction. Per warp,
per key tile (each body handles one ``BLOCK_N`` tile). Our kernel has two such loops: the hot loop over full key
tiles (no masking; listed first in the table) and the masked loop that only the boundary tile(s) of a row take;
the ratio uses the hot loop, the masked loop is reported beside it.

The dense reference is the Triton-tutorial flash forward loop (scale folded into the exp2 FMA, pointer increments,
no masking, ``tl.dot`` accumulating into ``acc``) compiled with our kernel's BLOCK_M/BLOCK_N/warps/stages, the
same fp16 inputs and the same strides (BSHD views of a fused QKV tensor, as the diffusers processors pass them).
Our kernel runs the RainFusion configuration: 128x64 list blocks, compact pattern table, with/without key padding.

    python benchmarks/kernel_sass.py [--json OUT] [--arch sm_90 sm_80] [--head-dim 64 128]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # @triton.jit must build real kernels (importers run it in a clean subprocess)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = {"sm_90": (9, 0), "sm_80": (8, 0)}
_MMA = re.compile(r"\b(HMMA|HGMMA|IMMA|mma\.sync|wgmma\.mma_async)")


@triton.jit
def _dense_flash_kernel(
    Q, K, V, O,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    H, NK, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Minimal dense flash forward (Triton tutorial loop): N a multiple of BLOCK_N, no masks, no sparsity."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd)
    k_ptrs = K + b * s_kb + h * s_kh + offs_d[:, None] * s_kd + offs_n[None, :] * s_kn
    v_ptrs = V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for _ in range(0, NK, BLOCK_N):
        kt = tl.load(k_ptrs)
        qk = tl.dot(q, kt)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * s_kn
        v_ptrs += BLOCK_N * s_vn
    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, out.to(O.dtype.element_ty))


def _compile_check_module():
    spec = importlib.util.spec_from_file_location("_triton_compile_check", ROOT / "tests" / "_triton_compile_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tool(name: str) -> str | None:
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else shutil.which(name)


def toolchain_missing() -> str | None:
    """Why this machine cannot compile ahead of time (None when it can)."""
    if _tool("ptxas") is None:
        return "triton's bundled ptxas is missing"
    try:
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"triton {triton.__version__} lacks the compile internals used here ({e})"
    return None


# ------------------------------------------------------------------------------------------- parsing compiled code
_SASS_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRA = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_PTX_LABEL = re.compile(r"^(\$L__\w+):")
_PTX_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def _parse(text: str, kind: str) -> tuple[list[str], dict[str, int], list[tuple[int, str]]]:
    """(instructions, label -> index of the next instruction, [(index, target label)] of branches)."""
    insns: list[str] = []
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    lab_re, bra_re = (_SASS_LABEL, _SASS_BRA) if kind == "SASS" else (_PTX_LABEL, _PTX_BRA)
    for line in text.splitlines():
        m = lab_re.match(line.strip())
        if m:
            labels[m.group(1)] = len(insns)
            continue
        if kind == "SASS":
            m = _SASS_INSN.match(line)
            if not m:
                continue
            insn = m.group(2)
        else:
            insn = line.strip()
            if not insn or insn.startswith(("//", ".", "{", "}", ")", "(")) or insn.endswith(":"):
                continue
        b = bra_re.search(insn)
        if b:
            branches.append((len(insns), b.group(1)))
        insns.append(insn)
    return insns, labels, branches


def mma_loops(text: str, kind: str = "SASS") -> list[dict]:
    """The loops (head label .. backward branch) that contain a tensor-core instruction, in code order:
    ``{"start", "end", "instructions"}`` with NOPs excluded."""
    insns, labels, branches = _parse(text, kind)
    loops = []
    for at, target in branches:
        head = labels.get(target)
        if head is None or head > at:
            continue
        body = insns[head: at + 1]
        if not any(_MMA.search(i) for i in body):
            continue
        n = sum(1 for i in body if not re.match(r"^(@!?U?P\w+\s+)?NOP\b|^nop\b", i))
        loops.append({"start": head, "end": at, "instructions": n})
    loops.sort(key=lambda x: x["start"])
    return loops


def disassemble(kernel) -> tuple[str, str]:
    """(text, "SASS" | "PTX") of a compiled kernel."""
    nvdisasm = _tool("nvdisasm")
    if nvdisasm is None:
        return kernel.asm["ptx"], "PTX"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    return out, "SASS"


def resources(kernel, capability: tuple[int, int]) -> dict:
    """Registers per thread, shared memory (bytes) and spill stores/loads (bytes) of a compiled kernel: ptxas -v
    rerun on the kernel's PTX with the flags triton's ``make_cubin`` passes (the cubin does not record spills)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    res = {"shared_bytes": kernel.metadata.shared, "registers": None, "spill_bytes": None}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(kernel.asm["ptx"])
        cap = capability[0] * 10 + capability[1]
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cap)}", str(path), "-o", str(Path(d) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=False).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    r = re.search(r"Used (\d+) registers", log)
    if m and r:
        res["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        res["registers"] = int(r.group(1))
    return res


# ------------------------------------------------------------------------------------------------- compiling
def compile_ours(cc, cap: tuple[int, int], head_dim: int, key_padding: bool, n: int = 4096):
    """Our kernel as RainFusion launches it (128x64 lists, pattern table, fused-QKV views, fp16)."""
    with cc.capture_launches(cap) as launches:
        cc.bsa_call(head_dim, torch.float16, n=n, kpm=key_padding)
    (fn, args, kwargs), = [x for x in launches if x[0].fn.__name__ == "_bsa_fwd_kernel"]
    return cc.compile_launch(fn, args, kwargs, cap), kwargs


def compile_dense(cc, cap: tuple[int, int], head_dim: int, tiles: dict, n: int = 4096):
    B, H = 1, 2
    qkv = torch.zeros(B, n, 3, H, head_dim, dtype=torch.float16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    o = torch.empty(B, H, n, head_dim, dtype=torch.float16)
    args = (q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, n, 0.125)
    kwargs = {k: tiles[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")}
    return cc.compile_launch(_dense_flash_kernel, args, kwargs, cap)


def measure(arch: str, head_dim: int, key_padding: bool, cc=None) -> dict:
    cc = cc or _compile_check_module()
    cap = ARCHS[arch]
    ours, kw = compile_ours(cc, cap, head_dim, key_padding)
    dense = compile_dense(cc, cap, head_dim, kw)
    (ours_text, kind), (dense_text, kind_d) = disassemble(ours), disassemble(dense)
    ours_loops, dense_loops = mma_loops(ours_text, kind), mma_loops(dense_text, kind_d)
    if not ours_loops or len(dense_loops) != 1:
        raise RuntimeError(f"{arch} D={head_dim}: expected MMA loops, found ours {ours_loops} dense {dense_loops}")
    sub = kw["LIST_BN"] // kw["BLOCK_N"]  # key tiles per loop iteration (static_range in our kernel)
    hot = ours_loops[0]["instructions"] / sub
    dense_n = dense_loops[0]["instructions"]
    r_ours, r_dense = resources(ours, cap), resources(dense, cap)
    return {
        "arch": arch, "head_dim": head_dim, "key_padding": key_padding, "ratio": round(hot / dense_n, 3),
        "count": kind, "ours_loop": hot, "dense_loop": dense_n,
        "ours_masked_loop": (ours_loops[1]["instructions"] / sub) if len(ours_loops) > 1 else None,
        "ours_loops": len(ours_loops), "dtype": "float16",
        "tiles": {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")},
        "ours_registers": r_ours["registers"], "ours_shared_bytes": r_ours["shared_bytes"],
        "ours_spill_bytes": r_ours["spill_bytes"],
        "dense_registers": r_dense["registers"], "dense_shared_bytes": r_dense["shared_bytes"],
        "dense_spill_bytes": r_dense["spill_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    a = ap.parse_args(argv)
    why = toolchain_missing()
    if why:
        print(f"cannot compile ahead of time here: {why}")
        return 3
    cc = _compile_check_module()
    rows = []
    print(f"triton {triton.__version__}, torch {torch.__version__}: compiled code, no GPU "
          f"({datetime.date.today().isoformat()})")
    hdr = (f"{'arch':6} {'D':>4} {'kpad':>5} {'count':>5} {'ours':>6} {'dense':>6} {'ratio':>6} {'masked':>7} "
           f"{'regs':>9} {'smem KiB':>11} {'spill B':>8}")
    print(hdr)
    for arch in a.arch:
        for d in a.head_dim:
            for kp in (False, True):
                r = measure(arch, d, kp, cc)
                rows.append(r)
                print(f"{arch:6} {d:>4} {kp!s:>5} {r['count']:>5} {r['ours_loop']:>6.0f} {r['dense_loop']:>6} "
                      f"{r['ratio']:>6.3f} {r['ours_masked_loop'] or float('nan'):>7.0f} "
                      f"{r['ours_registers']}/{r['dense_registers']:<5} "
                      f"{r['ours_shared_bytes'] / 1024:>5.1f}/{r['dense_shared_bytes'] / 1024:<5.1f} "
                      f"{r['ours_spill_bytes']}/{r['dense_spill_bytes']}")
    print("ours/dense: instructions per warp per key tile in the loop body (ours: the hot full-tile loop; masked: "
          "the boundary-tile loop); regs, smem, spill: ours/dense")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
