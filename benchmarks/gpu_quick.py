"""The short GPU check: correctness, kernel table, full RainFusion calls and denoising steps, in about 8 minutes.

    python benchmarks/gpu_quick.py --out OUTDIR            # or: bash benchmarks/gpu_quick.sh [OUTDIR]
    python benchmarks/gpu_quick.py --dry-run --out OUTDIR  # CPU, tiny shapes, TRITON_INTERPRET=1: checks the script

Sections (each in its own process with its own time box, so a failure, a hang or a poisoned CUDA context in one
does not stop the others):

* ``env``: torch / triton / diffusers versions, GPU name.
* ``correctness``: bf16 and fp16 at the real shapes (CogVideoX-5B 17,776 tokens 48x64; HunyuanVideo 720p 119,056
  tokens 24x128 with padded text; the RainFusion tables of both) for the Triton kernel and, when registered, the
  ``flex`` backend, against an fp32 reference on sampled query blocks; the ARM probe kernel against its PyTorch
  path (``benchmarks/gpu_check.py``'s checks).
* ``kernels_cogvideox`` / ``kernels_hunyuan``: block density 1.0 / 0.25 / 0.1, ours vs SDPA (flash and cuDNN via
  ``sdpa_kernel``) vs FlexAttention with the same lists, batch 1 (``benchmarks/attention_kernels.py``'s lists and
  rows; Flex last, since it compiles per mask). Rows are saved as they are measured: a time-out keeps them.
* ``rainfusion``: one full layer call (ARM + plan + kernels) on planted-structure Q/K at both shapes, rf1 with dense
  heads on SDPA, in the kernel and ``auto`` (the route its one-time timing picked, with both times), and rf2, vs
  dense SDPA; then rf1 (dense heads in the kernel) and rf2 captured in a CUDA graph and replayed (replay equal to
  the eager call, eager vs replay time).
* ``step_cogvideox`` / ``step_hunyuan``: one denoising step, dense vs RainFusion (``benchmarks/step_e2e.py``):
  CogVideoX-5B 49 frames; HunyuanVideo 720p at ``--hunyuan-frames`` (default 49, i.e. 13 latent frames, 47,056
  tokens, so the section fits its time box; the full 129 frames is ``--hunyuan-frames 129``).

Writes ``OUTDIR/gpu_quick.json`` (every section: status, seconds, data or error), ``OUTDIR/<section>.log`` and
prints one summary table (also ``OUTDIR/summary.md``). Exits non-zero when a correctness check fails or a section
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: section -> time box in seconds on a GPU (480 s in all). A section that runs out of time keeps what it saved.
SECTIONS = {"env": 15, "correctness": 75, "kernels_cogvideox": 60, "kernels_hunyuan": 100, "rainfusion": 90,
            "step_cogvideox": 45, "step_hunyuan": 95}
DRY_RUN_BOX = 300


# --------------------------------------------------------------------------- sections (run in a child process)
def _device(dry: bool):
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run to check the script on CPU)")
    return torch.device("cuda")


def section_env(args) -> dict:
    from _common import environment

    return environment(_device(args.dry_run))


def section_correctness(args) -> dict:
    import torch

    import gpu_check
    from diffusers_attn.kernels import available_backends, block_mask_to_lists, num_blocks
    from diffusers_attn.layout import TokenLayout
    from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod

    device = _device(args.dry_run)
    if args.dry_run:
        dtypes = [torch.float16]  # the interpreter's bf16 dot is broken
        cases = [("tiny hd64 (padded)", 1, 2, 160, 64, 32, 32)]
        layouts = [("RainFusion tables, tiny", TokenLayout.video_first((4, 6, 8), 10), 2, 32, 6, 32, 32)]
    else:
        dtypes = [torch.bfloat16, torch.float16]
        cases = [("CogVideoX-5B shape", 1, 48, 17_776, 64, 128, 64),
                 ("HunyuanVideo 720p shape (padded)", 1, 24, 119_056, 128, 128, 64)]
        layouts = [("RainFusion tables, CogVideoX-5B", TokenLayout.text_first((13, 30, 45), 226), 48, 64, None,
                    128, 64),
                   ("RainFusion tables, HunyuanVideo 720p", TokenLayout.video_first((33, 45, 80), 256), 24, 128, 64,
                    128, 64)]
    backends = ["triton"] + (["flex"] if "flex" in available_backends() else [])
    rows, all_ok = [], True
    for dtype in dtypes:
        for name, B, H, n, D, bm, bn in cases:
            g = torch.Generator().manual_seed(n)
            torch.manual_seed(n)  # inputs drawn on the device: a CPU draw of 1e9 values would eat the time box
            q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype) for _ in range(3))
            mask = torch.rand(B, H, num_blocks(n, bm), num_blocks(n, bn), generator=g) < 0.25
            mask[..., 0] = True
            idx, cnt = (t.to(device) for t in block_mask_to_lists(mask))
            kpm = torch.ones(B, n, dtype=torch.bool, device=device)
            if "padded" in name:
                kpm[:, -min(192, n // 10):] = False
            for backend in backends:
                ok = _guarded(gpu_check.check_case, f"{name} {dtype} {backend}", q, k, v, idx, cnt, bm, bn, kpm,
                              backend=backend, lse=backend == "triton")
                rows.append({"case": name, "dtype": str(dtype), "backend": backend, "ok": ok})
                all_ok &= ok is True
                args.save({"all_ok": False, "partial": True, "backends": backends, "rows": rows})
            del q, k, v
        for name, layout, H, D, valid_text, bm, bn in layouts:
            plan = RainFusionMethod(RainFusionConfig(sparsity=0.75, block_m=bm, block_n=bn)).plan(layout)
            t_idx, t_cnt = (t.to(device) for t in plan.pattern_tables())
            torch.manual_seed(1)
            q, k, v = (torch.randn(1, H, layout.seq_len, D, device=device, dtype=dtype) for _ in range(3))
            head_table = (torch.arange(H, dtype=torch.int32) % 4).view(1, H).to(device)
            kpm = None
            if valid_text is not None:
                kpm = torch.ones(1, layout.seq_len, dtype=torch.bool, device=device)
                kpm[:, layout.text_offset + valid_text: layout.text_offset + layout.text_len] = False
            for backend in backends:
                ok = _guarded(gpu_check.check_case, f"{name} {dtype} {backend}", q, k, v, None, None, bm, bn, kpm,
                              table=(t_idx, t_cnt, head_table), backend=backend)
                rows.append({"case": name, "dtype": str(dtype), "backend": backend, "ok": ok})
                all_ok &= ok is True
                args.save({"all_ok": False, "partial": True, "backends": backends, "rows": rows})
            del q, k, v
    probe_ok = _guarded(gpu_check.check_probe, device, dtypes, smoke=args.dry_run)
    rows.append({"case": "ARM probe", "dtype": ",".join(map(str, dtypes)), "backend": "triton", "ok": probe_ok})
    all_ok &= probe_ok is True
    return {"all_ok": all_ok, "backends": backends, "rows": rows}


def _guarded(fn, *args, **kwargs):
    """Run one check; an exception becomes its message (the section goes on)."""
    try:
        return bool(fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _kernels(args, shape: str) -> dict:
    """SDPA (flash, cuDNN) dense, ours at density 1.0 / 0.25 / 0.1, then Flex on the same lists (last: it compiles).
    Rows of ``attention_kernels.py``'s table; each saved as soon as it is measured."""
    import attention_kernels as ak
    import torch
    import torch.nn.functional as F

    from diffusers_attn.kernels import block_sparse_attention

    device = _device(args.dry_run)
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    name = "smoke" if args.dry_run else shape
    n, H, D = ak.SHAPES[name]
    bm, bn = (32, 32) if args.dry_run else (128, 64)
    timing = {"device": device, "warmup": 0 if args.dry_run else 2,
              "repeats": 1 if args.dry_run else (5 if name == "hunyuan-720p" else 10)}
    from _common import timeit

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, device=device, dtype=dtype) for _ in range(3))
    table = {"shape": name, "batch": 1, "tokens": n, "heads": H, "head_dim": D, "rows": []}
    rows = table["rows"]
    backends = {"math/cpu": None}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for label, backend in backends.items():
        def fn(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            t = timeit(fn, **timing)
            rows.append({"path": f"SDPA dense ({label})", "density": 1.0, **t,
                         "tflops": 4.0 * H * n * n * D / t["median_ms"] / 1e9})
        except Exception as e:  # noqa: BLE001
            rows.append({"path": f"SDPA dense ({label})", "error": str(e).splitlines()[0] if str(e) else repr(e)})
        args.save({"tables": [table]})
    best = min((r["median_ms"] for r in rows if "median_ms" in r), default=float("nan"))
    lists = {}
    for density in (1.0, 0.25, 0.1):
        mask, idx, cnt = ak.random_lists(1, H, n, bm, bn, density, device)
        pairs = ak.computed_pairs(mask, n, bm, bn)
        lists[density] = (idx, cnt, pairs)
        try:
            t = timeit(lambda idx=idx, cnt=cnt: block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn,
                                                                       backend="triton"), **timing)
            rows.append({"path": "ours (triton)", "density": pairs / (H * n * n), **t,
                         "tflops": 4.0 * pairs * D / t["median_ms"] / 1e9,
                         "speedup_vs_best_sdpa": best / t["median_ms"]})
        except Exception as e:  # noqa: BLE001
            rows.append({"path": "ours (triton)", "error": f"{type(e).__name__}: {e}"})
        args.save({"tables": [table]})
    if not args.dry_run:  # Flex compiles per mask: last, so a time-out loses only Flex rows
        ours = {r["density"]: r for r in rows if r["path"] == "ours (triton)" and "median_ms" in r}
        for density, (idx, cnt, pairs) in lists.items():
            rho = pairs / (H * n * n)
            row = {"path": "Flex (same lists)", "density": rho}
            fx, why = ak.flex_fn(idx, cnt, n, bm, bn, device)
            if fx is None:
                row["error"] = why
            else:
                try:
                    t = timeit(lambda fx=fx: fx(q, k, v), **timing)
                    row.update(t, tflops=4.0 * pairs * D / t["median_ms"] / 1e9,
                               speedup_vs_best_sdpa=best / t["median_ms"])
                    if rho in ours:
                        ours[rho]["flex_median_ms"] = t["median_ms"]
                        ours[rho]["ratio_vs_flex"] = t["median_ms"] / ours[rho]["median_ms"]
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"flex run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            args.save({"tables": [table]})
    return {"tables": [table]}


def section_kernels_cogvideox(args) -> dict:
    return _kernels(args, "cogvideox-5b")


def section_kernels_hunyuan(args) -> dict:
    return _kernels(args, "hunyuan-720p")


def section_rainfusion(args) -> dict:
    import attention_kernels as ak
    import torch

    device = _device(args.dry_run)
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    shapes = ["smoke"] if args.dry_run else ["cogvideox-5b", "hunyuan-720p"]
    timing = {"device": device, "warmup": 0 if args.dry_run else 2, "repeats": 1 if args.dry_run else 5}
    import diffusers_attn.testing as testing

    planted, cache = testing.planted_qkv, {}

    def planted_once(layout, batch, kinds, *a, **kw):  # the three variants of a shape share one (CPU-drawn) input
        key = (layout, batch, tuple(kinds), a, tuple(sorted(kw.items())))
        if key not in cache:
            cache.clear()
            cache[key] = planted(layout, batch, kinds, *a, **kw)
        return cache[key]

    testing.planted_qkv = planted_once
    rows = []
    for name in shapes:
        for mode, dense_heads in (("rf1", "sdpa"), ("rf1", "kernel"), ("rf1", "auto"), ("rf2", "sdpa")):
            ns = SimpleNamespace(sparsity=0.75, block_m=32 if args.dry_run else 128,
                                 block_n=32 if args.dry_run else 64, backend="triton", mode=mode,
                                 dense_heads=dense_heads)
            label = mode if mode == "rf2" else f"rf1, dense heads on {dense_heads}"
            try:
                # the dense SDPA call is the same for every variant of a shape: timed once
                dense_ms = next((x["dense_sdpa_ms"] for x in rows if x.get("shape") == name and "dense_sdpa_ms" in x),
                                None)
                r = ak.rainfusion_call(name, ns, device, dtype, timing, dense_ms=dense_ms)
                rows.append({"variant": label, **r})
            except Exception as e:  # noqa: BLE001
                rows.append({"shape": name, "variant": label, "error": f"{type(e).__name__}: {e}"})
            args.save({"rows": rows})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    graphs = []  # after the timings, so a capture problem cannot cost them
    for name in shapes:
        for mode in ("rf1", "rf2"):
            ns = SimpleNamespace(sparsity=0.75, block_m=32 if args.dry_run else 128,
                                 block_n=32 if args.dry_run else 64, backend="triton", mode=mode, dense_heads="kernel")
            label = "rf2" if mode == "rf2" else "rf1, dense heads on kernel"
            try:
                graphs.append({"variant": label, **ak.rainfusion_graph(name, ns, device, dtype, timing)})
            except Exception as e:  # noqa: BLE001
                graphs.append({"shape": name, "variant": label, "captured": False,
                               "error": f"{type(e).__name__}: {e}"})
            args.save({"rows": rows, "graphs": graphs})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "graphs": graphs}


def _step(args, model: str, frames: int | None) -> dict:
    import step_e2e
    import torch

    device = _device(args.dry_run)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    ns = SimpleNamespace(frames=frames, sparsity=0.75, arm_threshold=0.9, repeats=1 if args.dry_run else 2,
                         warmup=0 if args.dry_run else 1, compile=False, smoke=args.dry_run, reduced_opensora=False)
    timing = {"device": device, "warmup": ns.warmup, "repeats": ns.repeats}
    return step_e2e.run(model, ns, device, dtype, timing)


def section_step_cogvideox(args) -> dict:
    return _step(args, "cogvideox-5b", None)


def section_step_hunyuan(args) -> dict:
    return _step(args, "hunyuan-720p", None if args.dry_run else args.hunyuan_frames)


def _route(row: dict) -> str:
    """The dense-head route of an ``auto`` row and the timing it came from."""
    meas = [m for m in row.get("dense_heads_measured") or [] if "kernel_ms" in m]
    if row.get("dense_heads_route") is None or not meas:
        return ""
    m = meas[-1]
    return f", auto -> {row['dense_heads_route']} (kernel {m['kernel_ms']:.3f} ms vs SDPA {m['sdpa_ms']:.3f} ms)"


# --------------------------------------------------------------------------- driver
def _child(args) -> int:
    sys.path[:0] = [str(HERE), str(ROOT)]
    args.save = lambda data: Path(args.result).write_text(json.dumps(data, indent=1, default=str))
    fn = globals()[f"section_{args.section}"]
    data = fn(args)
    Path(args.result).write_text(json.dumps(data, indent=1, default=str))
    return 0


def _run_section(name: str, args, out: Path) -> dict:
    box = DRY_RUN_BOX if args.dry_run else SECTIONS[name]
    result = out / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(result),
           "--hunyuan-frames", str(args.hunyuan_frames)] + (["--dry-run"] if args.dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=box)
            status = "ok" if proc.returncode == 0 and result.exists() else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {box} s" + (" (partial results kept)" if result.exists() else "")
    entry = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "time_box_s": box}
    if result.exists():
        entry["data"] = json.loads(result.read_text())
        result.unlink()
    else:
        tail = (out / f"{name}.log").read_text().strip().splitlines()[-5:]
        entry["error"] = "\n".join(tail)
    return entry


def _fmt(x, spec=".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else ("" if x is None else str(x))


def summary(results: dict) -> str:
    """One markdown table of everything measured."""
    lines = ["| section | item | value |", "|---|---|---|"]
    for name, entry in results["sections"].items():
        data = entry.get("data") or {}
        lines.append(f"| {name} | status | {entry['status']} ({entry['seconds']} s of {entry['time_box_s']} s) |")
        if name == "env" and data:
            lines.append(f"| env | versions | {data} |")
        for r in data.get("rows", []) if name == "correctness" else []:
            lines.append(f"| correctness | {r['case']} {r['dtype']} {r['backend']} | "
                         f"{'PASS' if r['ok'] is True else 'FAIL ' + str(r['ok'])} |")
        for t in data.get("tables", []):
            if "error" in t:
                lines.append(f"| {name} | {t['shape']} | {t['error']} |")
                continue
            for r in t["rows"]:
                if "error" in r:
                    lines.append(f"| {name} | {t['shape']} {r['path']} | {r['error']} |")
                    continue
                flex = (f", Flex {r['flex_median_ms']:.3f} ms (Flex/ours {r['ratio_vs_flex']:.2f})"
                        if "flex_median_ms" in r else (f", Flex: {r['flex']}" if "flex" in r else ""))
                vs = f", {r['speedup_vs_best_sdpa']:.2f}x best SDPA" if "speedup_vs_best_sdpa" in r else ""
                lines.append(f"| {name} | {t['shape']} {r['path']} density {r['density']:.3f} | "
                             f"{r['median_ms']:.3f} ms, {r['tflops']:.1f} TFLOP/s{vs}{flex} |")
        for r in data.get("rows", []) if name == "rainfusion" else []:
            if "error" in r:
                lines.append(f"| rainfusion | {r['shape']} {r['variant']} | {r['error']} |")
                continue
            lines.append(f"| rainfusion | {r['shape']} {r['variant']} | {r['rainfusion_ms']:.3f} ms vs SDPA "
                         f"{r['dense_sdpa_ms']:.3f} ms = {r['speedup']:.2f}x, density {r['density']:.3f}, "
                         f"{r['patterns']}{_route(r)} |")
        for r in data.get("graphs", []) if name == "rainfusion" else []:
            if "skipped" in r or "error" in r:
                lines.append(f"| CUDA graph | {r['shape']} {r['variant']} | {r.get('skipped') or r['error']} |")
                continue
            lines.append(f"| CUDA graph | {r['shape']} {r['variant']} | captured; replay {r['replay_ms']:.3f} ms vs "
                         f"eager {r['eager_ms']:.3f} ms, max |replay - eager| {r['max_abs_diff_vs_eager']:.2e} |")
        for r in data.get("rows", []) if name.startswith("step_") else []:
            dens = f", density {_fmt(r.get('density'))}" if "density" in r else ""
            lines.append(f"| {name} | {r['path']} | {r['median_ms']:.1f} ms, {_fmt(r.get('speedup', 1.0), '.2f')}x"
                         f"{dens} |")
        if "error" in entry:
            lines.append(f"| {name} | error | {entry['error'].splitlines()[-1] if entry['error'] else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_quick", help="output folder ($OUT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, numbers meaningless")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--hunyuan-frames", type=int, default=49)
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:
        return _child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"dry_run": args.dry_run, "hunyuan_frames": args.hunyuan_frames, "sections": {}}
    t0 = time.perf_counter()
    for name in args.sections:
        results["sections"][name] = entry = _run_section(name, args, out)
        print(f"[gpu_quick] {name}: {entry['status']} in {entry['seconds']} s", flush=True)
        (out / "gpu_quick.json").write_text(json.dumps(results, indent=1, default=str))  # after every section
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_quick.json").write_text(json.dumps(results, indent=1, default=str))
    table = summary(results)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"[gpu_quick] total {results['total_seconds']} s; results in {out}/gpu_quick.json")
    bad = [n for n, e in results["sections"].items() if e["status"] != "ok"]
    corr = results["sections"].get("correctness", {}).get("data", {})
    return 1 if bad or (corr and not corr.get("all_ok", False)) else 0


if __name__ == "__main__":
    sys.exit(main())
