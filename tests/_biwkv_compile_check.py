"""Compile the Bi-WKV Triton kernels for sm_90 without a GPU (frontend, LLVM, ptxas): catches what the interpreter
hides (e.g. non-constexpr globals). Run by tests/test_biwkv_triton.py in a subprocess without TRITON_INTERPRET."""
import inspect, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from diffusers_attn.kernels import biwkv_triton as bt

target = GPUTarget("cuda", 90, 32)
ptr_names = {"K", "V", "W", "U", "Y", "LOGD", "PP", "PN", "PD", "INIT", "SUM", "GY", "DK", "DV", "DW", "DU", "GR", "GA", "GB"}
ok = True
for name in ["_fwd_summary_kernel", "_fwd_carry_kernel", "_biwkv_fwd_kernel", "_bwd_summary_kernel", "_bwd_carry_kernel", "_biwkv_bwd_kernel"]:
    fn = getattr(bt, name)
    params = list(inspect.signature(fn.fn).parameters)
    sig, consts = {}, {}
    for p in params:
        if p in ("DELTA", "BLOCK_C"):
            sig[p] = "constexpr"; consts[(params.index(p),)] = 1 if p == "DELTA" else 64
        elif p in ptr_names:
            sig[p] = "*fp32" if p not in ("K", "V", "GY") else "*bf16"
        else:
            sig[p] = "i32"
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=target, options={"num_warps": bt._WARPS})
        print(name, "ok", len(k.asm.get("ptx", "")), "ptx chars; regs:", getattr(k, "n_regs", "?"))
    except Exception as e:
        ok = False
        print(name, "FAILED:", type(e).__name__, str(e)[:800])
sys.exit(0 if ok else 1)
