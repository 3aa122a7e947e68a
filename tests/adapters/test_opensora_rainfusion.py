"""RainFusion on OpenSoraTransformer3DModel (tiny): exactness at sparsity 0, sparse semantics through double- and
single-stream Flux attention (text first, its length inferred in single-stream calls), odd grids, the pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from diffusers_attn import (
    OpenSoraTransformer3DModel,
    RainFusionConfig,
    apply_rainfusion,
    get_attention_stats,
    remove_attention_acceleration,
)
from diffusers_attn.pipelines.tiny import build_tiny_opensora

SPARSE = dict(dense_steps=0, dense_layers=0, min_video_tokens=0, num_inference_steps=10)


def make(num_layers=1, num_single_layers=1, seed=0):
    torch.manual_seed(seed)
    return OpenSoraTransformer3DModel(
        in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        num_attention_heads=2, attention_head_dim=16, joint_attention_dim=12, pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def inputs(batch=2, frames=4, h=8, w=8, text_len=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 12, generator=g),
        pooled_projections=torch.randn(batch, 8, generator=g),
        timestep=torch.full((batch,), 0.5),
    )


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def test_sparsity0_equals_stock_bit_exact_and_remove():
    model = make(num_layers=2, num_single_layers=2)
    kw = inputs(frames=5, h=6, w=10)  # packed grid 5 x 3 x 5
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.0, num_inference_steps=10))
    assert sum(type(p).__name__ == "OpenSoraAttnProcessor" for p in model.attn_processors.values()) == 4
    assert torch.equal(run(model, kw), ref)
    stats = get_attention_stats(model)
    assert stats.dense_fallbacks == {"sparsity=0": 4} and stats.density == 1.0
    remove_attention_acceleration(model)
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in model.attn_processors.values())
    assert torch.equal(run(model, kw), ref)


def test_sparse_density_drops_on_odd_grid():
    model = make(num_layers=1, num_single_layers=2)
    kw = inputs(frames=5, h=10, w=14, text_len=7)  # packed grid 5 x 5 x 7: no dimension a multiple of 16
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(sparsity=0.75, arm_threshold=0.0, block_m=16, block_n=16, **SPARSE))
    out = run(model, kw)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    stats = get_attention_stats(model)
    assert stats.density < 1.0 and stats.video_density < 1.0
    assert len(stats.layers) == 3 and stats.pattern_histogram.get("fallback", 0) == 0


def test_full_window_on_odd_grid_equals_dense():
    """Spatial window T-1 keeps every block: the sparse path (partial blocks, text of odd length) is exact."""
    model = make(num_layers=1, num_single_layers=1)
    kw = inputs(frames=3, h=6, w=10, text_len=5)  # grid 3 x 3 x 5 = 45 video + 5 text tokens, 16-token blocks
    ref = run(model, kw)
    apply_rainfusion(model, RainFusionConfig(force_pattern="spatial", spatial_window=2, block_m=16, block_n=16,
                                             **SPARSE))
    out = run(model, kw)
    stats = get_attention_stats(model)
    assert stats.pattern_histogram.get("spatial", 0) > 0
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("dual,single", [(1, 0), (0, 1)])
def test_spatial_window0_isolates_frames(dual, single):
    """w=0: a query in frame t >= 1 sees frames {0, t} and the text; perturbing frame 3 leaves frames 1 and 2.

    The single-stream case checks that the text length is inferred from the grid (text first, 8 tokens)."""
    model = make(num_layers=dual, num_single_layers=single)
    kw = inputs(batch=1, frames=5, h=8, w=8, text_len=8)  # 16 tokens per frame, 8-token blocks align
    cfg = RainFusionConfig(force_pattern="spatial", spatial_window=0, block_m=8, block_n=8, **SPARSE)
    apply_rainfusion(model, cfg)
    a = run(model, kw)
    kw2 = dict(kw, hidden_states=kw["hidden_states"].clone())
    kw2["hidden_states"][:, :, 3] += 3.0
    b = run(model, kw2)
    assert torch.equal(a[:, :, 1], b[:, :, 1]) and torch.equal(a[:, :, 2], b[:, :, 2])
    assert not torch.equal(a[:, :, 0], b[:, :, 0])  # first-frame rows stay dense
    remove_attention_acceleration(model)
    c, d = run(model, kw), run(model, kw2)
    assert not torch.equal(c[:, :, 1], d[:, :, 1])  # the stock model mixes all frames


def test_pipeline_rainfusion_stock_at_zero_and_sparse_stats():
    spec = build_tiny_opensora()
    pipe = spec.pipe
    call = dict(height=64, width=64, num_frames=13, num_inference_steps=4, output_type="pt")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = pipe(**spec.prompt_kwargs("a fox"), **call, generator=g()).frames
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.0))
    assert torch.equal(pipe(**spec.prompt_kwargs("a fox"), **call, generator=g()).frames, ref)
    apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0.25, dense_layers=0, arm_threshold=0.0,
                                            min_video_tokens=0, block_m=16, block_n=16))
    out = pipe(**spec.prompt_kwargs("a fox"), **call, generator=g()).frames
    assert torch.isfinite(out).all()
    stats = get_attention_stats(pipe)
    assert stats.steps == 4 and stats.calls == 4 * 2  # CFG batched: one forward per step, 2 attention layers
    assert stats.dense_fallbacks == {"dense warm-up step": 2}
    assert 0 < stats.density < 1
    remove_attention_acceleration(pipe)


def test_compiled_fullgraph_equals_eager():
    """torch.compile(fullgraph=True) of the Open-Sora transformer with RainFusion: no graph break, no retrace per
    step, same output as eager (aot_eager keeps the arithmetic identical)."""
    cfg = RainFusionConfig(sparsity=0.75, dense_steps=1, dense_layers=1, min_video_tokens=0, arm_threshold=0.0,
                           block_m=16, block_n=16, num_inference_steps=3)
    model = make(num_layers=1, num_single_layers=1)
    kw = inputs(batch=1, frames=4, h=6, w=10, text_len=5)

    def three(fn):
        outs = []
        for t in (0.9, 0.5, 0.1):
            with torch.no_grad():
                outs.append(fn(**dict(kw, timestep=torch.full((1,), t))).sample)
        return outs

    apply_rainfusion(model, cfg)
    eager = three(model)
    eager_stats = get_attention_stats(model, log=False)
    apply_rainfusion(model, cfg)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = three(compiled)
    stats = get_attention_stats(model, log=False)
    assert all(torch.equal(a, b) for a, b in zip(outs, eager))
    assert stats.steps == 3 and stats.calls == eager_stats.calls and stats.density < 1.0


def _cp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the 2-process Ulysses test (spawned; gloo on CPU)."""
    import os


    from diffusers_attn import get_attention_context
    from diffusers_attn.parallel import enable_context_parallel

    from _gloo import gloo_rank

    with gloo_rank(init_file, rank, world):
        for sparsity in (0.0, 0.75):
            torch.manual_seed(0)
            model = OpenSoraTransformer3DModel(
                in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, num_attention_heads=4,
                attention_head_dim=16, joint_attention_dim=12, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
            ).eval()
            kw = inputs(batch=2, frames=4, h=8, w=12, text_len=5)  # grid 4 x 4 x 6 = 96 video tokens
            kw["condition"] = torch.randn(2, 5, 4, 8, 12, generator=torch.Generator().manual_seed(3))
            apply_rainfusion(model, RainFusionConfig(sparsity=sparsity, arm_threshold=0.0, block_m=16, block_n=16,
                                                     **SPARSE))
            ctx = get_attention_context(model)
            with torch.no_grad():
                ref = model(**kw).sample
                ref_dec = {k: v.patterns.copy() for k, v in ctx.last_decisions.items()}
                enable_context_parallel(model, ulysses_degree=world)
                out = model(**kw).sample
                out_nocond = model(**dict(kw, condition=None)).sample
            dec = {k: (v.patterns.copy(), v.head_offset) for k, v in ctx.last_decisions.items()}
            torch.save({"ref": ref, "out": out, "out_nocond": out_nocond, "ref_dec": ref_dec, "dec": dec,
                        "density": ctx.stats.summary().density}, os.path.join(out_dir, f"{sparsity}-rank{rank}.pt"))


def test_ulysses_degree2_equals_single_process(tmp_path):
    """2 gloo processes, Ulysses degree 2: output and per-head patterns equal the single-process run (sparsity 0
    and 0.75); only video tokens are sharded (text of odd length 5 stays whole)."""
    import numpy as np
    import torch.multiprocessing as mp

    mp.start_processes(_cp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for sparsity in (0.0, 0.75):
        for rank in range(2):
            r = torch.load(tmp_path / f"{sparsity}-rank{rank}.pt", weights_only=False)
            assert rel_err(r["out"], r["ref"]) <= 1e-5, (sparsity, rank)
            assert torch.isfinite(r["out_nocond"]).all() and not torch.equal(r["out_nocond"], r["out"])
            if sparsity > 0:
                assert r["density"] < 1.0 and r["ref_dec"]
                for layer, (pat, off) in r["dec"].items():
                    h = pat.shape[1]
                    assert off == rank * h
                    assert np.array_equal(pat, r["ref_dec"][layer][:, off : off + h])


def test_context_parallel_uneven_video_split_is_a_clear_error():
    from types import SimpleNamespace

    model = make()
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2, ring_degree=1))
    with pytest.raises(ValueError, match=r"grid \(3, 3, 5\) has 45 tokens.*multiple of 2"):
        run(model, inputs(frames=3, h=6, w=10))
