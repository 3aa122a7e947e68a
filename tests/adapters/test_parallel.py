"""Ulysses context parallelism (diffusers' engine, gloo on CPU, 2 processes) and its error paths."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_cogvideox, rel_err

from diffusers_attn import RainFusionConfig, apply_rainfusion


@pytest.mark.parametrize("model", ["cogvideox", "hunyuan"])
def test_ulysses_degree2_equals_single_process(tmp_path, model):
    """2 gloo processes, Ulysses degree 2, fp32: output and per-head patterns equal the single-process run, at
    sparsity 0 and 0.75 (HunyuanVideo with padded text in one batch element)."""
    import _cp_worker

    init = tmp_path / "init"
    sparsities = (0.0, 0.75)
    mp.start_processes(_cp_worker.run, args=(2, str(init), model, sparsities, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for sparsity, rank in ((s, r) for s in sparsities for r in range(2)):
        r = torch.load(tmp_path / f"{sparsity}-rank{rank}.pt", weights_only=False)
        assert rel_err(r["out"], r["ref"]) <= 1e-5, rank
        if sparsity > 0:
            assert r["density"] < 1.0
            assert r["ref_dec"], "the single-process run made no sparse decisions"
            chosen = {int(p) for pat in r["ref_dec"].values() for p in pat.flatten()}
            assert len(chosen - {0}) >= (2 if model == "cogvideox" else 1), chosen  # cover more than one pattern
            for layer, (pat, off) in r["dec"].items():
                h = pat.shape[1]
                assert off == rank * h
                assert np.array_equal(pat, r["ref_dec"][layer][:, off : off + h]), (rank, layer)


def test_cp_requires_installed_processors_and_refuses_ring():
    from diffusers_attn.parallel import UlyssesExchange, enable_context_parallel

    m = make_cogvideox()
    with pytest.raises(ValueError, match="install an accelerated attention first"):
        enable_context_parallel(m, ulysses_degree=2)
    apply_rainfusion(m, RainFusionConfig(sparsity=0.0, num_inference_steps=4))
    with pytest.raises(ValueError, match="ring attention is not supported"):
        enable_context_parallel(m, ulysses_degree=1, ring_degree=2)

    class _Cfg:
        ring_degree, _ulysses_mesh = 2, None

    with pytest.raises(ValueError, match="ring attention"):
        UlyssesExchange(_Cfg())


def test_torchrun_launcher_matches_single_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m diffusers_attn.generate` (gloo on CPU) writes once, same video as 1 rank."""
    import shutil
    import subprocess
    import sys

    from diffusers_attn.generate import main

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    common = ["--steps", "2", "--frames", "9", "--height", "64", "--width", "64", "--arm-threshold", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "diffusers_attn.generate", *common,
         "--out", str(tmp_path / "cp.mp4"), "--json", str(tmp_path / "cp.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes
    assert main([*common, "--out", str(tmp_path / "one.mp4"), "--json", str(tmp_path / "one.json")]) == 0
    a, b = np.load(tmp_path / "cp.npy"), np.load(tmp_path / "one.npy")
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
