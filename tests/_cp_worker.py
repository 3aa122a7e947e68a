"""Worker for the 2-process context-parallel tests (spawned by tests/test_parallel.py)."""

from __future__ import annotations

import os

import torch


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


def run(rank: int, world: int, init_file: str, model: str, sparsities: tuple, out_dir: str,
        token_order: str = "raster") -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from conftest import cogvideox_inputs, hunyuan_inputs, make_cogvideox, make_hunyuan, make_wan, wan_inputs

    from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_context
    from diffusers_attn.parallel import enable_context_parallel

    from _gloo import gloo_rank

    with gloo_rank(init_file, rank, world):
        for sparsity in sparsities:
            torch.manual_seed(0)
            if model == "cogvideox":
                m = make_cogvideox("1.5", heads=4, head_dim=16)
                # latent 5x8x8: spatial and temporal plans are sparse here, so ARM mixes patterns across heads
                inputs = cogvideox_inputs(m, batch=2, frames=10, size=16)
            elif model.startswith("wan"):
                m = make_wan(num_layers=2, heads=4, head_dim=12)
                inputs = wan_inputs(batch=2, frames=5, h=8, w=32)  # grid 5 x 4 x 16
                inputs["return_dict"] = False  # diffusers' Wan plan splits at the model itself: tuple output only
                if model == "wan-ti2v":  # one timestep per token (split with the tokens)
                    g = torch.Generator().manual_seed(2)
                    inputs["timestep"] = torch.randint(0, 1000, (2, 5 * 4 * 16), generator=g)
            else:
                m = make_hunyuan(heads=4, head_dim=10, num_layers=1, num_single_layers=1)
                inputs = hunyuan_inputs(batch=2, frames=4, size=8, text_len=12, valid=(5, 12))
            # argmax at threshold 0: every head sparse with its own best pattern, so heads mix patterns
            cfg = RainFusionConfig(sparsity=sparsity, dense_steps=0, dense_layers=0, min_video_tokens=0,
                                   arm_threshold=0.0, arm_rule="argmax", block_m=16, block_n=16,
                                   num_inference_steps=10, token_order=token_order)
            apply_rainfusion(m, cfg)
            ctx = get_attention_context(m)
            with torch.no_grad():
                ref = _sample(m(**inputs))
                ref_dec = {k: v.patterns.copy() for k, v in ctx.last_decisions.items()}
                enable_context_parallel(m, ulysses_degree=world)
                out = _sample(m(**inputs))
            dec = {k: (v.patterns.copy(), v.head_offset) for k, v in ctx.last_decisions.items()}
            torch.save({"ref": ref, "out": out, "ref_dec": ref_dec, "dec": dec, "density": ctx.stats.summary().density,
                        "token_order": ctx.token_order},
                       os.path.join(out_dir, f"{sparsity}-rank{rank}.pt"))
