"""One denoising step of full-size video transformers (published configs, random weights, no download), dense vs
RainFusion, bf16 on GPU.

    python benchmarks/step_e2e.py                                  # CogVideoX-5B 49x480x720, HunyuanVideo 129x720x1280
    python benchmarks/step_e2e.py --models hunyuan-720p --frames 65  # fewer frames if memory needs it (stated)
    python benchmarks/step_e2e.py --smoke                          # tiny configs on CPU: checks the script only
    python benchmarks/step_e2e.py --models opensora-256px opensora-768px  # Open-Sora 2.0 (11.9B), 129 frames
    python benchmarks/step_e2e.py --models opensora-256px --reduced-opensora --frames 33  # CPU: 2 heads, 1+1 layers
    python benchmarks/step_e2e.py --models wan2.1-14b-720p          # Wan2.1-T2V-14B 81x720x1280 (75,600 tokens)
    python benchmarks/step_e2e.py --models hunyuanvideo-1.5-720p   # HunyuanVideo-1.5 720p T2V (8.3B), 121 frames

Random weights have no attention structure, so ARM at its default threshold keeps most heads dense; the step is
therefore also timed with ``arm_threshold=0`` (every head takes its best sparse pattern), which is what a step
costs when heads are sparse. Both are reported, with realized density. The RainFusion step is a sparse step
(after warm-up); layer 0 stays dense as by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, timeit  # noqa: E402

from diffusers_attn import RainFusionConfig, apply_rainfusion, get_attention_stats, remove_attention_acceleration  # noqa: E402

COGVIDEOX_5B = dict(  # THUDM/CogVideoX-5b transformer/config.json
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0, flip_sin_to_cos=True,
    freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-5,
    num_attention_heads=48, num_layers=42, out_channels=16, patch_size=2, sample_frames=49, sample_height=60,
    sample_width=90, spatial_interpolation_scale=1.875, temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu",
    use_rotary_positional_embeddings=True,
)


# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: diffusers' WanTransformer3DModel defaults are this config
WAN21_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _build_wan(frames, device, smoke):
    """Wan2.1 T2V 14B at 720p: latent (F-1)/4+1 x 90 x 160, patch (1, 2, 2); self-attention is video only, the
    512 (padded) UMT5 tokens enter through cross-attention."""
    from diffusers import WanTransformer3DModel

    cfg = dict(WAN21_14B)
    lat_f, lat_h, lat_w, text_len = (frames - 1) // 4 + 1, 90, 160, 512
    if smoke:
        cfg.update(num_attention_heads=2, attention_head_dim=64, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
        lat_f, lat_h, lat_w, text_len = 5, 16, 16, 16
    model = WanTransformer3DModel(**cfg).eval()
    kwargs = dict(
        hidden_states=torch.randn(1, 16, lat_f, lat_h, lat_w),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, text_len, cfg["text_dim"]),
    )
    n = lat_f * (lat_h // 2) * (lat_w // 2)
    desc = (f"{frames} frames -> latent {lat_f}x{lat_h}x{lat_w}, {n} video tokens (self-attention), "
            f"{text_len} text tokens (cross-attention), {cfg['num_layers']} layers")
    return model, kwargs, desc


OPENSORA_LATENT = {"opensora-256px": (24, 42), "opensora-768px": (72, 128)}  # 16:9, spec opensora.md 4.3


def _build_opensora(name, frames, device, smoke, reduced):
    """Open-Sora 2.0 (hpcai-tech/Open-Sora-v2 release config, 11.9B) at 256px / 768px 16:9."""
    from diffusers_attn import OpenSoraTransformer3DModel

    lat_f = (frames - 1) // 4 + 1
    lat_h, lat_w = OPENSORA_LATENT[name]
    cfg, text_len = {}, 512
    if smoke:
        cfg = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=64,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 24, 24))
        lat_f, lat_h, lat_w, text_len = 5, 16, 16, 16
    elif reduced:  # head_dim 128 and the real 512-token text, but 2 heads, 1+1 layers: what a shared CPU can time
        cfg = dict(num_layers=1, num_single_layers=1, num_attention_heads=2)
    model = OpenSoraTransformer3DModel(**cfg).eval()
    c = model.config
    kwargs = dict(
        hidden_states=torch.randn(1, c.in_channels, lat_f, lat_h, lat_w),
        encoder_hidden_states=torch.randn(1, text_len, c.joint_attention_dim),
        pooled_projections=torch.randn(1, c.pooled_projection_dim),
        timestep=torch.tensor([0.5], device=device),
    )
    n = lat_f * (lat_h // 2) * (lat_w // 2)
    layers = f"{c.num_layers}+{c.num_single_layers} layers" if (smoke or reduced) else "19+38 layers"
    desc = f"{frames} frames -> latent {lat_f}x{lat_h}x{lat_w}, {n + text_len} tokens ({n} video + {text_len} text), {layers}"
    return model, kwargs, desc


def _build_hunyuan_video15(frames, device, smoke):
    """HunyuanVideo-1.5 720p T2V (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v: diffusers' defaults
    with target_size 960, task_type t2v; 8.3B) at 1280x720: latent 31x45x80 for 121 frames (VAE 4x16, patch 1).
    Conditioning as the pipeline builds it: 1000 Qwen2.5-VL tokens (80 valid), 256 ByT5 tokens (none valid: no
    quoted text), 729 zero image tokens (masked for T2V). The stock processor materialises an N x N boolean mask
    (about 13 GB at 113,585 tokens) in every dense call; use --frames to shrink the video if memory runs out."""
    from diffusers import HunyuanVideo15Transformer3DModel

    lat_f, lat_h, lat_w, text_len, byt5_len, image_len, valid = (frames - 1) // 4 + 1, 45, 80, 1000, 256, 729, 80
    cfg = dict(target_size=960, task_type="t2v")
    if smoke:
        cfg.update(num_attention_heads=2, attention_head_dim=64, num_layers=2, num_refiner_layers=1,
                   text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(16, 24, 24))
        lat_f, lat_h, lat_w, text_len, byt5_len, image_len, valid = 5, 16, 16, 16, 8, 4, 8
    model = HunyuanVideo15Transformer3DModel(**cfg).eval()
    c = model.config
    mask = torch.zeros(1, text_len, dtype=torch.bool)
    mask[:, :valid] = True
    kwargs = dict(
        hidden_states=torch.randn(1, c.in_channels, lat_f, lat_h, lat_w),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, text_len, c.text_embed_dim),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.zeros(1, byt5_len, c.text_embed_2_dim),
        encoder_attention_mask_2=torch.zeros(1, byt5_len, dtype=torch.bool),
        image_embeds=torch.zeros(1, image_len, c.image_embed_dim),
    )
    n = lat_f * lat_h * lat_w
    cond = text_len + byt5_len + image_len
    desc = (f"{frames} frames -> latent {lat_f}x{lat_h}x{lat_w}, {n + cond} tokens ({n} video + {cond} conditioning, "
            f"{valid} valid), {c.num_layers} layers")
    return model, kwargs, desc


def build(name, frames, device, dtype, smoke, reduced=False):
    """(model, forward kwargs, description)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: a 13B fp32 copy would not fit
    try:
        with torch.device(device):
            if name == "cogvideox-5b":
                from diffusers import CogVideoXTransformer3DModel
                from diffusers.models.embeddings import get_3d_rotary_pos_embed

                cfg = dict(COGVIDEOX_5B)
                lat_f, lat_h, lat_w, text_len = (frames - 1) // 4 + 1, 60, 90, 226
                if smoke:
                    cfg.update(num_attention_heads=2, attention_head_dim=64, num_layers=2, text_embed_dim=32,
                               time_embed_dim=32, sample_height=16, sample_width=16)
                    lat_f, lat_h, lat_w, text_len = 5, 16, 16, 16
                model = CogVideoXTransformer3DModel(**cfg).eval()
                gh, gw = lat_h // 2, lat_w // 2
                cos, sin = get_3d_rotary_pos_embed(cfg["attention_head_dim"], ((0, 0), (gh, gw)), (gh, gw), lat_f,
                                                   device=device)
                kwargs = dict(
                    hidden_states=torch.randn(1, lat_f, 16, lat_h, lat_w),
                    encoder_hidden_states=torch.randn(1, text_len, cfg["text_embed_dim"]),
                    timestep=torch.tensor([500], device=device),
                    image_rotary_emb=(cos.to(dtype), sin.to(dtype)),
                )
                desc = f"{frames} frames -> latent {lat_f}x{lat_h}x{lat_w}, {lat_f * gh * gw + text_len} tokens"
            elif name.startswith("opensora"):
                model, kwargs, desc = _build_opensora(name, frames, device, smoke, reduced)
            elif name.startswith("wan"):
                model, kwargs, desc = _build_wan(frames, device, smoke)
            elif name == "hunyuanvideo-1.5-720p":
                model, kwargs, desc = _build_hunyuan_video15(frames, device, smoke)
            else:
                from diffusers import HunyuanVideoTransformer3DModel

                lat_f, lat_h, lat_w, text_len, valid = (frames - 1) // 4 + 1, 90, 160, 256, 64
                cfg = {}
                if smoke:
                    cfg = dict(num_attention_heads=2, attention_head_dim=64, num_layers=1, num_single_layers=1,
                               num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16,
                               rope_axes_dim=(16, 24, 24))
                    lat_f, lat_h, lat_w, text_len, valid = 5, 16, 16, 16, 8
                model = HunyuanVideoTransformer3DModel(**cfg).eval()
                mask = torch.zeros(1, text_len, dtype=torch.bool)
                mask[:, :valid] = True
                kwargs = dict(
                    hidden_states=torch.randn(1, 16, lat_f, lat_h, lat_w),
                    timestep=torch.tensor([500], device=device),
                    encoder_hidden_states=torch.randn(1, text_len, model.config.text_embed_dim),
                    encoder_attention_mask=mask,
                    pooled_projections=torch.randn(1, model.config.pooled_projection_dim),
                    guidance=torch.tensor([6000.0], device=device),
                )
                desc = (f"{frames} frames -> latent {lat_f}x{lat_h}x{lat_w}, "
                        f"{lat_f * (lat_h // 2) * (lat_w // 2) + text_len} tokens ({valid} valid text)")
    finally:
        torch.set_default_dtype(default)
    return model, kwargs, desc


def run(name, args, device, dtype, timing):
    frames = args.frames or {"cogvideox-5b": 49, "wan2.1-14b-720p": 81, "hunyuanvideo-1.5-720p": 121}.get(name, 129)
    model, kwargs, desc = build(name, frames, device, dtype, args.smoke, getattr(args, "reduced_opensora", False))
    if args.smoke:
        desc = "SMOKE (tiny config, CPU; numbers meaningless): " + desc.split("-> ", 1)[1]
    params = sum(p.numel() for p in model.parameters())

    def step():
        with torch.no_grad():
            return model(**kwargs).sample

    out = {"model": name, "setting": desc, "params_b": params / 1e9, "rows": []}
    t = timeit(step, **timing)
    out["rows"].append({"path": "dense (stock processors)", **t})
    for thr in (args.arm_threshold, 0.0):
        # threshold 0 means "every head takes its best sparse pattern": the argmax rule (cheapest would take the
        # cheapest pattern for every head)
        cfg = RainFusionConfig(sparsity=args.sparsity, dense_steps=0, dense_layers=1, arm_threshold=thr,
                               arm_rule="argmax" if thr == 0 else "cheapest",
                               min_video_tokens=0 if args.smoke or args.reduced_opensora else 4096,
                               block_m=32 if args.smoke else 128, block_n=32 if args.smoke else 64)
        apply_rainfusion(model, cfg)
        ts = timeit(step, **timing)
        st = get_attention_stats(model, log=False)
        n_calls = max(st.calls, 1)
        out["rows"].append({
            "path": f"RainFusion sparsity {args.sparsity}, arm_threshold {thr}", **ts,
            "speedup": t["median_ms"] / ts["median_ms"], "density": st.density, "video_density": st.video_density,
            "patterns": st.pattern_histogram,
            "per_step_breakdown_ms": {k: v / n_calls * len(st.layers) for k, v in st.timings_ms.items()},
        })
        remove_attention_acceleration(model)
    if args.compile:
        for label, cfg in (("dense", None), (f"RainFusion sparsity {args.sparsity}, arm_threshold "
                                              f"{args.arm_threshold}", "rf")):
            if cfg:
                apply_rainfusion(model, RainFusionConfig(
                    sparsity=args.sparsity, dense_steps=0, dense_layers=1, arm_threshold=args.arm_threshold,
                    min_video_tokens=0 if args.smoke or args.reduced_opensora else 4096, block_m=32 if args.smoke else 128,
                    block_n=32 if args.smoke else 64))
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)

            def cstep():
                with torch.no_grad():
                    return compiled(**kwargs).sample

            tc = timeit(cstep, **{**timing, "warmup": max(timing["warmup"], 1)})  # the first call compiles
            row = {"path": f"compiled {label}", **tc, "speedup": t["median_ms"] / tc["median_ms"]}
            if cfg:
                st = get_attention_stats(model, log=False)
                row.update(density=st.density, video_density=st.video_density, patterns=st.pattern_histogram)
                remove_attention_acceleration(model)
            out["rows"].append(row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["cogvideox-5b", "hunyuan-720p"])
    p.add_argument("--frames", type=int, default=None, help="override the frame count (state it when reporting)")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--arm-threshold", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd steps (dense and RainFusion at --arm-threshold), fullgraph")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks the script, numbers meaningless")
    p.add_argument("--reduced-opensora", action="store_true",
                   help="Open-Sora with 2 heads x 128 and 1+1 layers (real latent grid and 512 text tokens), fp32 "
                        "on CPU (state it when reporting)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.repeats, args.warmup = 1, 0
    elif args.reduced_opensora and not torch.cuda.is_available():
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --smoke to check the script on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    env = environment(device)
    print(f"# {env}\n# {dtype}, median of {args.repeats} after {args.warmup} warm-up")
    results = []
    for name in args.models:
        r = run(name, args, device, dtype, timing)
        results.append(r)
        print(f"\n## {name} ({r['params_b']:.2f} B params): {r['setting']}")
        print("| path | step median ms (p20-p80) | speedup | density (all / video) | patterns |")
        print("|---|---|---|---|---|")
        for x in r["rows"]:
            dens = f"{x['density']:.3f} / {x['video_density']:.3f}" if "density" in x else "1 / 1"
            print(f"| {x['path']} | {x['median_ms']:.1f} ({x['p20_ms']:.1f}-{x['p80_ms']:.1f}) | "
                  f"{x.get('speedup', 1.0):.2f} | {dens} | {x.get('patterns', '')} |")
            if "per_step_breakdown_ms" in x:
                print(f"|  per-step breakdown (ms) | {x['per_step_breakdown_ms']} | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
