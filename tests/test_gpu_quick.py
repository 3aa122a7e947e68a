"""``benchmarks/gpu_quick.py --dry-run`` (CPU, tiny shapes) runs every section and writes its JSON and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_quick_dry_run_writes_json(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_quick.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_quick.json").read_text())
    sections = res["sections"]
    assert set(sections) == {"env", "correctness", "kernels_cogvideox", "kernels_hunyuan", "rainfusion",
                             "step_cogvideox", "step_hunyuan"}
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    assert sections["correctness"]["data"]["all_ok"] is True
    rf_rows = {r["variant"]: r for r in sections["rainfusion"]["data"]["rows"]}
    assert set(rf_rows) == {"rf1, dense heads on sdpa", "rf1, dense heads on kernel", "rf1, dense heads on auto", "rf2"}
    assert rf_rows["rf1, dense heads on auto"]["dense_heads_route"] == "sdpa"  # CPU: no timing, SDPA
    graphs = sections["rainfusion"]["data"]["graphs"]
    assert [g["variant"] for g in graphs] == ["rf1, dense heads on kernel", "rf2"]
    assert all(g["skipped"] == "CUDA graphs need a CUDA device" for g in graphs)  # CPU: nothing to capture
    assert [r["path"] for r in sections["step_hunyuan"]["data"]["rows"]][0] == "dense (stock processors)"
    kernels = sections["kernels_hunyuan"]["data"]["tables"][0]["rows"]
    assert [r["path"] for r in kernels].count("ours (triton)") == 3 and all("median_ms" in r for r in kernels)
    assert "| kernels_hunyuan | smoke ours (triton)" in (tmp_path / "summary.md").read_text()


def test_gpu_quick_isolates_a_failing_section(tmp_path, monkeypatch):
    """A section that fails (here: no CUDA device) is recorded as failed and the others still run."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_quick
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_quick, "SECTIONS", {"env": 120, "correctness": 120})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    rc = gpu_quick.main(["--out", str(tmp_path), "--sections", "env", "correctness"])
    res = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert rc == 1
    assert set(res["sections"]) == {"env", "correctness"}
    assert all(s["status"].startswith("failed") for s in res["sections"].values())
    assert "no CUDA device" in res["sections"]["correctness"]["error"]
