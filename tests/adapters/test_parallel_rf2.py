"""rf2 under Ulysses context parallelism (gloo on CPU, 2 processes): each rank selects for its own heads, with
global head ids, and the result equals the single-process run."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.multiprocessing as mp
from conftest import rel_err


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from conftest import hunyuan_inputs, make_hunyuan

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_context
    from diffusers_attn.parallel import enable_context_parallel

    from _gloo import gloo_rank

    with gloo_rank(init_file, rank, world):
        torch.manual_seed(0)
        m = make_hunyuan(heads=4, head_dim=10, num_layers=1, num_single_layers=1)
        inputs = hunyuan_inputs(batch=2, frames=4, size=8, text_len=12, valid=(5, 12))
        apply_rainfusion(m, RainFusionConfig(mode="rf2", sparsity=0.6, dense_steps=0, dense_layers=0,
                                             min_video_tokens=0, block_m=16, block_n=16, num_inference_steps=10))
        ctx = get_attention_context(m)
        with torch.no_grad():
            ref = m(**inputs).sample
            ref_dec = {k: v.kept_mass.copy() for k, v in ctx.last_decisions.items()}
            enable_context_parallel(m, ulysses_degree=world)
            out = m(**inputs).sample
        dec = {k: (v.kept_mass.copy(), v.head_offset) for k, v in ctx.last_decisions.items()}
        torch.save({"ref": ref, "out": out, "ref_dec": ref_dec, "dec": dec, "density": ctx.stats.summary().density},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_rf2_ulysses_degree2_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert rel_err(r["out"], r["ref"]) <= 1e-5, rank
        assert r["density"] < 1.0 and r["dec"]
        for layer, (kept, off) in r["dec"].items():
            h = kept.shape[1]
            assert off == rank * h
            np.testing.assert_allclose(kept, r["ref_dec"][layer][:, off : off + h], rtol=1e-5)
