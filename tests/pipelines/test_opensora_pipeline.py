"""OpenSoraPipeline end to end on tiny components (t2v, i2v), its sampler against the reference rules, loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err

from diffusers_attn import OpenSoraPipeline
from diffusers_attn.pipelines.opensora.pipeline import add_prompt_suffix, resolution_to_size
from diffusers_attn.pipelines.tiny import build_tiny_opensora

SMALL = dict(height=32, width=48, num_frames=9, num_inference_steps=3)


@pytest.fixture(scope="module")
def spec():
    return build_tiny_opensora()


def _kw(spec, prompt="a red fox in snow"):
    return spec.prompt_kwargs(prompt)


def _image(seed=0, h=40, w=56):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g)  # [0, 1] tensor image, resize-cropped by the pipeline


def _reference_resize_crop(img: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Official ``resize_crop`` on a [1, 3, H, W] tensor in [0, 1] saved as 8-bit RGB, written from
    https://github.com/hpcaitech/Open-Sora/blob/main/opensora/datasets/utils.py (``resize_crop_to_fill``):
    PIL bicubic resize to cover, crop at round((s - t) / 2), ToTensor, Normalize(0.5, 0.5)."""
    from PIL import Image

    arr = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    w, h = pil.size
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        i, j = 0, int(round((sw - tw) / 2.0))
    else:
        sh, sw = round(h * rw), tw
        i, j = int(round((sh - th) / 2.0)), 0
    out = np.array(pil.resize((sw, sh), Image.BICUBIC))[i : i + th, j : j + tw]
    return (torch.from_numpy(out).float().div(255).permute(2, 0, 1)[None] - 0.5) / 0.5


def test_t2v_end_to_end_output_types(spec):
    pipe = spec.pipe
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pt = pipe(**_kw(spec), **SMALL, output_type="pt", generator=g()).frames
    assert pt.shape == (1, 9, 3, 32, 48) and torch.isfinite(pt).all()
    np_out = pipe(**_kw(spec), **SMALL, output_type="np", generator=g()).frames
    assert np_out.shape == (1, 9, 32, 48, 3)
    np.testing.assert_allclose(np_out, pt.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    pil = pipe(**_kw(spec), **SMALL, output_type="pil", generator=g()).frames
    assert len(pil[0]) == 9 and pil[0][0].size == (48, 32)
    lat = pipe(**_kw(spec), **SMALL, output_type="latent", generator=g()).frames
    assert lat.shape == (1, 4, 3, 4, 6)
    # height/width are rounded up to multiples of 16
    assert pipe(**_kw(spec), **dict(SMALL, height=30, width=40), output_type="latent", generator=g()).frames.shape == (
        1, 4, 3, 4, 6)


def _reference_sigmas(n, h_lat, w_lat, t_lat, p=2):
    """Reference sampler: alpha = (m S + b) sqrt(T_lat), the line through (256, 1) and (4096, 3); sigma <- a s / (1 + (a-1) s)."""
    s_tok = (h_lat // p) * (w_lat // p)
    m = (3 - 1) / (4096 - 256)
    alpha = (m * s_tok + (1 - 256 * m)) * math.sqrt(t_lat)
    s = np.linspace(1, 0, n + 1)
    return alpha * s / (1 + (alpha - 1) * s), alpha


def test_scheduler_sigmas_equal_reference_formula(spec):
    pipe = spec.pipe
    seen = {}

    def cb(p, i, t, kw):
        seen["sigmas"] = p.scheduler.sigmas.clone()
        return kw

    pipe(**_kw(spec), **dict(SMALL, num_inference_steps=7), output_type="latent", callback_on_step_end=cb)
    ref, _ = _reference_sigmas(7, 4, 6, 3)
    np.testing.assert_allclose(seen["sigmas"].double().numpy(), ref, atol=1e-6)
    # full-size values: alpha ~ 5.73 (256px 16:9) and ~ 11.87 (768px), 33 latent frames
    assert abs(_reference_sigmas(1, 24, 42, 33)[1] - 5.73) < 0.01
    assert abs(_reference_sigmas(1, 72, 128, 33)[1] - 11.87) < 0.01
    from diffusers_attn.pipelines.opensora.pipeline import reference_sigmas, shift_alpha

    np.testing.assert_allclose(reference_sigmas(50, shift_alpha(12 * 21, 33)), _reference_sigmas(50, 24, 42, 33)[0])


def test_resolution_buckets_and_prompt_suffix():
    assert resolution_to_size("256px", "16:9") == (192, 336)
    assert resolution_to_size("768px", "16:9") == (576, 1024)
    assert resolution_to_size("768px", "1:1") == (768, 768)
    assert add_prompt_suffix("raining, sea", 24, 4) == "raining, sea. 24 FPS. 4 motion score."
    assert add_prompt_suffix("a cat.", 24, 4) == "a cat. 24 FPS. 4 motion score."
    with pytest.raises(ValueError, match="resolution must be one of"):
        resolution_to_size("512px", "1:1")
    with pytest.raises(ValueError, match="aspect_ratio must be one of"):
        resolution_to_size("256px", "7:3")


def _official_buckets(total_pixels: int) -> dict[str, tuple[int, int]]:
    """``get_aspect_ratios_dict(total_pixels, training=False)`` as inference calls it (via ``get_image_size``),
    re-derived from https://github.com/hpcaitech/Open-Sora/blob/main/opensora/datasets/aspect.py: per listed
    ratio W:H, width = floor(sqrt(P W/H) / 16) * 16, height = floor(P / width / 16) * 16; the swapped name gets
    the swapped size and those entries override the direct ones."""
    ld_list = ["2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1"]
    direct, swapped = {}, {}
    for ratio in ld_list:
        wr, hr = map(float, ratio.split(":"))
        width = int(math.sqrt(total_pixels * (wr / hr)) // 16) * 16
        height = int((total_pixels / width) // 16) * 16
        direct[ratio] = (height, width)
        swapped[":".join(ratio.split(":")[::-1])] = (width, height)
    direct.update(swapped)
    return direct


def test_aspect_ratio_buckets_match_the_official_table():
    from diffusers_attn.pipelines.opensora.sampling import ASPECT_RATIO_BUCKETS

    checked = 0
    for res, side in (("256px", 256), ("768px", 768)):
        official = _official_buckets(side * side)
        assert set(ASPECT_RATIO_BUCKETS[res]) == set(official)
        for ratio, size in official.items():
            assert resolution_to_size(res, ratio) == size, (res, ratio)
            checked += 1
    assert checked == 30
    # portrait sizes are the landscape ones swapped, not computed directly (which gives (304, 208), (1104, 528))
    assert resolution_to_size("256px", "3:4") == (288, 224) and resolution_to_size("256px", "4:3") == (224, 288)
    assert resolution_to_size("768px", "1:2") == (1072, 544)


def test_prompt_suffix_keeps_an_existing_fps_like_the_official_check():
    # official: ensure a final period, add " {fps} FPS." unless re.search(r"\d+ FPS\.$"), always add motion score
    assert add_prompt_suffix("a cat. 24 FPS.", 24, 4) == "a cat. 24 FPS. 4 motion score."
    assert add_prompt_suffix("a cat 30 FPS", 24, 4) == "a cat 30 FPS. 4 motion score."
    assert add_prompt_suffix("  a cat. 16 FPS.  ", 24, "5") == "a cat. 16 FPS. 5 motion score."
    assert add_prompt_suffix("24 FPS. a cat", 24, 4) == "24 FPS. a cat. 24 FPS. 4 motion score."
    assert add_prompt_suffix("a cat at FPS.", 24, 4) == "a cat at FPS. 24 FPS. 4 motion score."


def test_preprocess_image_is_the_official_bicubic_resize_crop():
    from PIL import Image

    pipe = OpenSoraPipeline  # static method
    g = torch.Generator().manual_seed(3)
    for h, w, th, tw in [(40, 56, 32, 48), (90, 50, 32, 48), (20, 30, 64, 80), (33, 97, 48, 32)]:
        img = torch.rand(1, 3, h, w, generator=g)
        ref = _reference_resize_crop(img, th, tw)
        assert torch.equal(pipe.preprocess_image(img, th, tw), ref)
        arr = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
        assert torch.equal(pipe.preprocess_image(pil, th, tw), ref)
        assert torch.equal(pipe.preprocess_image(pil.convert("RGBA"), th, tw), ref)  # RGB, as the official loader
        assert torch.equal(pipe.preprocess_image(arr.astype(np.float32) / 255, th, tw), ref)
        assert torch.equal(pipe.preprocess_image([pil, pil], th, tw), torch.cat([ref, ref]))
    # not Lanczos: the diffusers default resample would give another image
    lanczos = np.asarray(pil.resize((tw, round(h * tw / w)), Image.LANCZOS), dtype=np.float32)
    bicubic = np.asarray(pil.resize((tw, round(h * tw / w)), Image.BICUBIC), dtype=np.float32)
    assert np.abs(lanczos - bicubic).max() > 0
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pipe.preprocess_image(img * 2 - 1, 32, 32)
    with pytest.raises(ValueError, match="must be a PIL image"):
        pipe.preprocess_image("photo.png", 32, 32)


def _official_tiled_decode(vae, z, tile_px: int):
    """The reference's ``spatial_tiled_decode`` (``opensora/models/hunyuan_vae/autoencoder_kl_causal_3d.py`` of
    https://github.com/hpcaitech/Open-Sora): latent tiles of tile_px / 8 at stride int(tile * 0.75), blended over
    int(tile_px * 0.25) pixels, each kept to tile_px - blend; all frames at once (no temporal tiling)."""
    tile_lat = tile_px // 8
    stride = int(tile_lat * 0.75)
    blend = int(tile_px * 0.25)
    keep = tile_px - blend

    def blend_v(a, b, n):
        n = min(a.shape[-2], b.shape[-2], n)
        for y in range(n):
            b[..., y, :] = a[..., -n + y, :] * (1 - y / n) + b[..., y, :] * (y / n)
        return b

    def blend_h(a, b, n):
        n = min(a.shape[-1], b.shape[-1], n)
        for x in range(n):
            b[..., x] = a[..., -n + x] * (1 - x / n) + b[..., x] * (x / n)
        return b

    rows = [[vae.decoder(vae.post_quant_conv(z[..., i : i + tile_lat, j : j + tile_lat]))
             for j in range(0, z.shape[-1], stride)] for i in range(0, z.shape[-2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = blend_h(row[j - 1], tile, blend)
            parts.append(tile[..., :keep, :keep])
        out_rows.append(torch.cat(parts, dim=-1))
    return torch.cat(out_rows, dim=-2)


def _official_tiled_encode_moments(vae, x, tile_px: int):
    """The reference's ``spatial_tiled_encode`` (same file): pixel tiles at stride int(tile * 0.75), latent
    blend int(tile / 8 * 0.25), each kept to tile / 8 - blend."""
    tile_lat = tile_px // 8
    stride = int(tile_px * 0.75)
    blend = int(tile_lat * 0.25)
    keep = tile_lat - blend
    rows = [[vae.quant_conv(vae.encoder(x[..., i : i + tile_px, j : j + tile_px]))
             for j in range(0, x.shape[-1], stride)] for i in range(0, x.shape[-2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend)
            parts.append(tile[..., :keep, :keep])
        out_rows.append(torch.cat(parts, dim=-1))
    return torch.cat(out_rows, dim=-2)


def test_vae_tiling_defaults_to_the_release_config_and_matches_the_official_tiling():
    pipe = build_tiny_opensora().pipe
    vae = pipe.vae
    # release config: use_spatial_tiling=True (256-px tiles, overlap 0.25), use_temporal_tiling=False
    assert vae.use_tiling and not vae.use_framewise_decoding and not vae.use_framewise_encoding
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width) == (256, 256)
    assert (vae.tile_sample_stride_height, vae.tile_sample_stride_width) == (192, 192)
    # the same rule at a tile the tiny test sizes exceed: 32 px (4 latents), 5 latent frames (> diffusers' 4)
    pipe.set_vae_tiling(tile_size=32)
    z = torch.randn(1, 4, 5, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = vae.decode(z).sample
        ref = _official_tiled_decode(vae, z.clone(), 32)
        untiled = vae.decoder(vae.post_quant_conv(z))
    assert got.shape == ref.shape == (1, 3, 17, 40, 56)
    assert rel_err(got, ref) <= 1e-6
    assert rel_err(got, untiled) > 1e-3  # tiles were really used
    x = torch.rand(1, 3, 1, 56, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        enc = vae.encode(x).latent_dist.mean
        ref_enc = _official_tiled_encode_moments(vae, x, 32).chunk(2, dim=1)[0]
    assert enc.shape == ref_enc.shape == (1, 4, 1, 7, 10) and rel_err(enc, ref_enc) <= 1e-6
    # trading memory: temporal chunks (diffusers' framewise decode) and the untiled decode are both available
    pipe.set_vae_tiling(spatial=False)
    with torch.no_grad():
        assert rel_err(vae.decode(z).sample, untiled) <= 1e-6
    pipe.set_vae_tiling(spatial=False, temporal=True)
    assert vae.use_framewise_decoding and not vae.use_tiling
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.set_vae_tiling(tile_size=100)


def _manual_sampler(pipe, kw, latents, n_steps, cond=None, g_txt=7.5, g_img=3.0):
    """The reference denoise loop (I2VDenoiser rules), written against the transformer directly."""
    tr = pipe.transformer
    t_lat = latents.shape[2]
    s_tok = (latents.shape[3] // 2) * (latents.shape[4] // 2)
    m = 2 / 3840
    alpha = (m * s_tok + 1 - 256 * m) * math.sqrt(t_lat)
    s = torch.linspace(1, 0, n_steps + 1, dtype=torch.float64)
    sig = (alpha * s / (1 + (alpha - 1) * s)).float()
    pos, neg = (kw["prompt_embeds"], kw["pooled_prompt_embeds"]), (kw["negative_prompt_embeds"],
                                                                     kw["negative_pooled_prompt_embeds"])
    x = latents.clone()
    for i in range(n_steps):
        osc = i >= 10 and i % 2 == 1
        tg = 1.0 if osc else g_txt
        ig = 1.0 if osc else g_img
        with torch.no_grad():
            def f(emb, c):
                return tr(hidden_states=x, encoder_hidden_states=emb[0], pooled_projections=emb[1],
                          timestep=sig[i].expand(1), condition=c).sample
            if cond is None:
                v_pos, v_neg = f(pos, None), f(neg, None)
                v = v_neg + tg * (v_pos - v_neg)
            else:
                v1, v2, v3 = f(pos, cond), f(neg, cond), f(neg, torch.zeros_like(cond))
                if ig > 1.0:
                    upper = torch.linspace(ig, 1.0, n_steps + 1)[i]
                    ig = torch.linspace(1.0, float(upper), t_lat).view(1, 1, -1, 1, 1)
                v = v3 + ig * (v2 - v3) + tg * (v1 - v2)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def test_t2v_sampler_matches_reference_loop(spec):
    pipe, kw = spec.pipe, _kw(spec)
    n = 12  # covers the oscillation (steps >= 10, odd)
    lat0 = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    out = pipe(**kw, **dict(SMALL, num_inference_steps=n), latents=lat0, output_type="latent").frames
    ref = _manual_sampler(pipe, kw, lat0, n)
    assert rel_err(out, ref) <= 1e-4


def test_i2v_head_sampler_conditioning_and_frame_overwrite(spec):
    pipe, kw = spec.pipe, _kw(spec)
    n = 12
    img = _image()
    lat0 = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(6))
    out = pipe(**kw, **dict(SMALL, num_inference_steps=n), image=img, latents=lat0, output_type="latent",
               sample_posterior=False).frames
    # the reference latent: resize-crop to 32x48, [-1, 1], encode one frame, posterior mode, x scaling factor
    pix = _reference_resize_crop(img, 32, 48).unsqueeze(2)
    with torch.no_grad():
        ref_lat = pipe.vae.encode(pix).latent_dist.mode() * pipe.vae.config.scaling_factor
    cond = torch.zeros(1, 5, 3, 4, 6)
    cond[:, 0, 0] = 1.0
    cond[:, 1:, 0] = ref_lat[:, :, 0]
    ref = _manual_sampler(pipe, kw, lat0, n, cond=cond)
    ref[:, :, 0] = ref_lat[:, :, 0]
    assert torch.equal(out[:, :, 0], ref_lat[:, :, 0])
    assert rel_err(out, ref) <= 1e-4
    # tail / loop condition the last / both latent frames
    tail = pipe(**kw, **SMALL, image=img, condition_type="i2v_tail", latents=lat0, output_type="latent",
                sample_posterior=False).frames
    assert torch.equal(tail[:, :, -1], ref_lat[:, :, 0]) and not torch.equal(tail[:, :, 0], ref_lat[:, :, 0])
    loop = pipe(**kw, **SMALL, image=img, condition_type="i2v_loop", latents=lat0, output_type="latent",
                sample_posterior=False).frames
    assert torch.equal(loop[:, :, 0], ref_lat[:, :, 0]) and torch.equal(loop[:, :, -1], ref_lat[:, :, 0])
    video = pipe(**kw, **SMALL, image=img, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 32, 48) and torch.isfinite(video).all()


def test_callback_can_edit_latents_and_counts_steps(spec):
    pipe, calls = spec.pipe, []

    def cb(p, i, t, kw):
        calls.append((i, float(t)))
        return {"latents": torch.zeros_like(kw["latents"])}

    out = pipe(**_kw(spec), **SMALL, output_type="latent", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).frames
    assert [c[0] for c in calls] == [0, 1, 2] and calls[0][1] == pytest.approx(1000.0)
    assert torch.equal(out, torch.zeros_like(out))
    assert pipe.num_timesteps == 3


def test_bad_inputs_are_clear_errors(spec):
    pipe, kw = spec.pipe, _kw(spec)
    with pytest.raises(ValueError, match="num_frames must be 4k\\+1"):
        pipe(**kw, **dict(SMALL, num_frames=10))
    with pytest.raises(ValueError, match="needs an `image`"):
        pipe(**kw, **SMALL, condition_type="i2v_tail")
    with pytest.raises(ValueError, match="condition_type must be one of"):
        pipe(**kw, **SMALL, condition_type="v2v_head", image=_image())
    with pytest.raises(ValueError, match="no T5 text_encoder"):
        pipe(prompt="a fox", **SMALL)
    with pytest.raises(ValueError, match="needs `pooled_prompt_embeds`"):
        pipe(prompt_embeds=kw["prompt_embeds"], **SMALL)
    with pytest.raises(ValueError, match="output_type"):
        pipe(**kw, **SMALL, output_type="gif")


def test_save_and_from_pretrained_roundtrip(spec, tmp_path):
    spec.pipe.save_pretrained(str(tmp_path / "pipe"))
    loaded = OpenSoraPipeline.from_pretrained(str(tmp_path / "pipe"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is None and type(loaded.transformer).__name__ == "OpenSoraTransformer3DModel"
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = spec.pipe(**_kw(spec), **SMALL, output_type="pt", generator=g()).frames
    b = loaded(**_kw(spec), **SMALL, output_type="pt", generator=g()).frames
    assert torch.equal(a, b)


def test_from_original_checkpoint_and_text_encoders(spec, tmp_path):
    """Original checkpoint -> pipeline in memory; real (tiny) T5 + CLIP encoders exercise the text path."""
    from safetensors.torch import save_file
    from test_opensora_convert import AXES, POOLED, TXT_DIM, original_state_dict
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    from diffusers_attn.pipelines.tiny import tiny_t5

    path = tmp_path / "Open_Sora_v2.safetensors"
    save_file(original_state_dict(seed=2), str(path))
    t5, t5_tok = tiny_t5(TXT_DIM)
    words = "a red fox in snow motion score fps . 24 4".split()
    vocab = {"<|pad|>": 0, "<|unk|>": 1, "<|endoftext|>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    clip_tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", unk_token="<|unk|>",
                                       eos_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=POOLED, intermediate_size=2 * POOLED,
                                        num_hidden_layers=1, num_attention_heads=2, projection_dim=POOLED,
                                        max_position_embeddings=77, eos_token_id=2)).eval()
    pipe = OpenSoraPipeline.from_original_checkpoint(
        path, vae=spec.pipe.vae, text_encoder=t5, tokenizer=t5_tok, text_encoder_2=clip, tokenizer_2=clip_tok,
        config_overrides={"axes_dims_rope": AXES},
    )
    pipe.set_progress_bar_config(disable=True)
    emb, pooled = pipe.encode_prompt(["a red fox in snow"])
    assert emb.shape == (1, 512, TXT_DIM) and pooled.shape == (1, POOLED)  # T5 padded to 512, unmasked
    video = pipe("a red fox in snow", **SMALL, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 3, 32, 48) and torch.isfinite(video).all()


def test_batching_num_videos_per_prompt_and_two_prompts(spec):
    pipe = spec.pipe
    kw = _kw(spec)
    lat = pipe(**kw, **SMALL, num_videos_per_prompt=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).frames
    assert lat.shape[0] == 2 and not torch.equal(lat[0], lat[1])  # same prompt, different noise
    two = {k: torch.cat([v, _kw(spec, "a blue cat")[k]]) for k, v in kw.items()}
    vid = pipe(**two, **SMALL, image=_image(), output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert vid.shape == (2, 9, 3, 32, 48) and torch.isfinite(vid).all()
