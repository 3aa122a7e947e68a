"""Tiny CogVideoX, HunyuanVideo, HunyuanVideo-1.5, Open-Sora and Wan pipelines built offline from configs (random weights, no download).

They exercise the real diffusers pipeline and model classes end to end on a CPU in seconds: the built-in default
of ``diffusers-attn compare`` and the test suite. Their weights are random, so their outputs say nothing about
quality; prompts become fixed pseudo-embeddings (one seeded vector per word) because there is no text encoder.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .opensora import OpenSoraPipeline, OpenSoraTransformer3DModel
from .opensora.convert import scheduler_for_opensora
from .var import VQVAE, VARPipeline, VARTransformer

TINY_MODELS = ("tiny-cogvideox", "tiny-cogvideox-1.5", "tiny-hunyuan", "tiny-opensora", "tiny-wan", "tiny-wan2.2",
               "tiny-hunyuanvideo-1.5")
# Class-conditional image models (VAR): separate from TINY_MODELS, whose entries are text-to-video pipelines.
TINY_VAR_MODELS = ("tiny-var",)
TINY_VAR_PATCH_NUMS = (1, 2, 3, 4, 6, 8)


@dataclass
class TinyPipelineSpec:
    """A built tiny pipeline plus what is needed to call it without a text encoder."""

    pipe: Any
    family: str  # "cogvideox" | "hunyuan_video" | "opensora" | "wan" | "hunyuan_video15"
    text_len: int
    text_dim: int
    pooled_dim: int = 0  # HunyuanVideo-1.5: the ByT5 (glyph text) embedding width
    defaults: dict[str, Any] | None = None
    text_len_2: int = 0  # HunyuanVideo-1.5: ByT5 tokens

    def prompt_kwargs(self, prompt: str, negative_prompt: str | None = None) -> dict[str, Any]:
        """Pipeline keyword arguments carrying pseudo-embeddings for ``prompt``."""
        emb, mask = prompt_embeddings(prompt, self.text_len, self.text_dim)
        if self.family in ("cogvideox", "wan"):  # padded states attended unmasked (Wan: through cross-attention)
            neg, _ = prompt_embeddings(negative_prompt or "", self.text_len, self.text_dim)
            return {"prompt_embeds": emb, "negative_prompt_embeds": neg}
        if self.family == "hunyuan_video15":
            return hunyuan_video15_prompt_kwargs(self, prompt, negative_prompt)
        pooled = pooled_embedding(prompt, self.pooled_dim)
        if self.family == "opensora":  # T5 states are attended unmasked; negative defaults to the empty prompt
            nemb, _ = prompt_embeddings(negative_prompt or "", self.text_len, self.text_dim)
            return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": nemb,
                    "negative_pooled_prompt_embeds": pooled_embedding(negative_prompt or "", self.pooled_dim)}
        kw = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}
        if negative_prompt is not None:
            nemb, nmask = prompt_embeddings(negative_prompt, self.text_len, self.text_dim)
            kw.update(
                negative_prompt_embeds=nemb,
                negative_pooled_prompt_embeds=pooled_embedding(negative_prompt, self.pooled_dim),
                negative_prompt_attention_mask=nmask,
            )
        return kw


def _word_vector(word: str, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(word.lower().encode()))
    return torch.randn(dim, generator=g)


def prompt_embeddings(prompt: str, text_len: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, text_len, dim) pseudo-embeddings (one seeded vector per word, zero padding) and the (1, text_len) mask."""
    words = prompt.split()[:text_len]
    emb = torch.zeros(1, text_len, dim)
    mask = torch.zeros(1, text_len, dtype=torch.bool)
    for i, w in enumerate(words):
        emb[0, i] = _word_vector(w, dim)
        mask[0, i] = True
    if not words:  # an empty prompt still needs one valid token for HunyuanVideo's mask
        mask[0, 0] = True
    return emb, mask


def pooled_embedding(prompt: str, dim: int) -> torch.Tensor:
    words = prompt.split() or [""]
    return torch.stack([_word_vector("pooled:" + w, dim) for w in words]).mean(0, keepdim=True)


def tiny_t5(d_model: int, seed: int = 0) -> tuple[Any, Any]:
    """A real (tiny, random) T5 encoder and a word-level fast tokenizer built offline: exercises the text path of
    pipelines that are loaded with ``from_pretrained`` (tests of the real loading code)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a an the red blue green fox cat dog runs running through in on snow water sky at sunrise".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=4)
    return T5EncoderModel(cfg).eval(), tokenizer


def build_tiny_cogvideox(
    seed: int = 0, version: str = "1.0", *, num_layers: int = 2, text_encoder: bool = False
) -> TinyPipelineSpec:
    """A CogVideoX pipeline with a 4-head x 16 transformer (RoPE, like CogVideoX-5B) and an 8-channel VAE.

    ``text_encoder=True`` adds a tiny real T5 encoder and tokenizer (see :func:`tiny_t5`).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    if version not in ("1.0", "1.5"):
        raise ValueError(f"version must be '1.0' or '1.5', got {version!r}")
    torch.manual_seed(seed)
    text_len, text_dim = 16, 32
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=text_dim,
        num_layers=num_layers,
        sample_width=16,
        sample_height=16,
        sample_frames=17,
        patch_size=2,
        patch_size_t=2 if version == "1.5" else None,
        temporal_compression_ratio=4,
        max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing")
    encoder, tokenizer = tiny_t5(text_dim, seed) if text_encoder else (None, None)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return TinyPipelineSpec(
        pipe, "cogvideox", text_len, text_dim,
        defaults={"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 8, "guidance_scale": 6.0},
    )


def build_tiny_hunyuan(seed: int = 0, *, num_layers: int = 1, num_single_layers: int = 1) -> TinyPipelineSpec:
    """A HunyuanVideo pipeline with a 2-head x 16 transformer (dual + single stream) and an 8-channel VAE."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    text_len, text_dim, pooled_dim = 16, 16, 8
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        rope_axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=scheduler,
        text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return TinyPipelineSpec(
        pipe, "hunyuan_video", text_len, text_dim, pooled_dim,
        defaults={"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 8, "guidance_scale": 6.0},
    )


def build_tiny_opensora(seed: int = 0, *, num_layers: int = 1, num_single_layers: int = 1) -> TinyPipelineSpec:
    """An Open-Sora 2.0 pipeline: a 2-head x 16 :class:`OpenSoraTransformer3DModel` (double + single stream,
    (t, h, w) RoPE) and an 8-channel HunyuanVideo VAE; the real scheduler configuration."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    text_len, text_dim, pooled_dim = 16, 32, 16
    transformer = OpenSoraTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=2, num_layers=num_layers, num_single_layers=num_single_layers,
        num_attention_heads=2, attention_head_dim=16, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    pipe = OpenSoraPipeline(transformer=transformer, scheduler=scheduler_for_opensora(), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipelineSpec(
        pipe, "opensora", text_len, text_dim, pooled_dim,
        defaults={"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 8, "guidance_scale": 6.0},
    )


def build_tiny_wan(seed: int = 0, *, experts: int = 1, num_layers: int = 2, text_encoder: bool = False
                   ) -> TinyPipelineSpec:
    """A Wan pipeline with 2-head x 16 ``WanTransformer3DModel`` s (patch (1, 2, 2), video-only self-attention,
    text through cross-attention) and a 3-channel Wan VAE (4x temporal, 8x spatial).

    ``experts=2`` is Wan 2.2 A14B's layout: ``transformer`` (high noise) and ``transformer_2`` (low noise) switched
    at ``boundary_ratio=0.5`` of the training timesteps. ``text_encoder=True`` adds a tiny real T5 encoder and
    tokenizer (see :func:`tiny_t5`).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    if experts not in (1, 2):
        raise ValueError(f"experts must be 1 or 2, got {experts!r}")
    torch.manual_seed(seed)
    text_len, text_dim = 16, 32

    def transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=64,
        )

    first = transformer()
    second = transformer() if experts == 2 else None
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    encoder, tokenizer = tiny_t5(text_dim, seed) if text_encoder else (None, None)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=first, transformer_2=second, boundary_ratio=0.5 if experts == 2 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return TinyPipelineSpec(
        pipe, "wan", text_len, text_dim,
        defaults={"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 8, "guidance_scale": 5.0},
    )


def hunyuan_video15_prompt_kwargs(spec: TinyPipelineSpec, prompt: str,
                                  negative_prompt: str | None = None) -> dict[str, Any]:
    """HunyuanVideo-1.5's four embedding inputs (and the negative ones, which its CFG guider needs: the negative
    defaults to the empty prompt): Qwen2.5-VL-like states + mask, and ByT5-like states + mask of the quoted (glyph)
    text, zero with an all-False mask when there is none, as the pipeline does."""
    kw: dict[str, Any] = {}
    for prefix, text in (("", prompt), ("negative_", negative_prompt or "")):
        emb, mask = prompt_embeddings(text, spec.text_len, spec.text_dim)
        glyph = " ".join(text.split('"')[1::2])  # the words inside double quotes
        if glyph.strip():
            emb2, mask2 = prompt_embeddings(glyph, spec.text_len_2, spec.pooled_dim)
        else:
            emb2 = torch.zeros(1, spec.text_len_2, spec.pooled_dim)
            mask2 = torch.zeros(1, spec.text_len_2, dtype=torch.bool)
        kw.update({f"{prefix}prompt_embeds": emb, f"{prefix}prompt_embeds_mask": mask,
                   f"{prefix}prompt_embeds_2": emb2, f"{prefix}prompt_embeds_mask_2": mask2})
    return kw


def tiny_hunyuan_video15_text_encoders(text_dim: int, byt5_dim: int, seed: int = 0) -> dict[str, Any]:
    """HunyuanVideo-1.5's two text encoders, tiny and random, built offline: a 2-layer Qwen2.5-VL text model with a
    byte-level tokenizer and a chat template (the pipeline crops the first 108 template tokens and takes the third
    hidden state from the end), and a 1-layer T5 encoder with the (file-less) ByT5 tokenizer. For tests of the real
    ``from_pretrained`` + prompt path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        Qwen2TokenizerFast,
        T5Config,
        T5EncoderModel,
    )

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, bos_token=None)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, text_dim // 4 - 2]},
    )).eval()
    tokenizer_2 = ByT5Tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=byt5_dim, d_ff=2 * byt5_dim, d_kv=4,
                                 num_layers=1, num_heads=2)).eval()
    return {"text_encoder": qwen, "tokenizer": tokenizer, "text_encoder_2": t5, "tokenizer_2": tokenizer_2}


def build_tiny_hunyuan_video15(seed: int = 0, *, num_layers: int = 2, guidance_scale: float = 6.0,
                               text_encoders: bool = False) -> TinyPipelineSpec:
    """A HunyuanVideo-1.5 text-to-video pipeline: a 2-head x 16 transformer (dual-stream blocks, text refiner, ByT5
    and image projections) and a 4-channel, 16x-spatial HunyuanVideo-1.5 VAE; classifier-free guidance through the
    pipeline's guider (``guidance_scale`` lives there, not in ``__call__``). ``text_encoders=True`` adds tiny real
    text encoders (:func:`tiny_hunyuan_video15_text_encoders`).

    The VAE decodes one video at a time (``enable_slicing``): its causal mid-block attention mask is built with a
    batch dimension that SDPA broadcasts against the head dimension, so decoding a batch > 1 fails in diffusers
    0.42 (``output with shape [2, 1, N, N] doesn't match the broadcast shape [2, 2, N, N]``)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(seed)
    text_len, text_dim, byt5_len, byt5_dim, latent = 16, 16, 8, 8, 4
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * latent + 1,  # noisy latents + conditioning latents + conditioning mask
        out_channels=latent,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=text_dim,
        text_embed_2_dim=byt5_dim,
        image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
        target_size=64,
        task_type="t2v",
    )
    vae = AutoencoderKLHunyuanVideo15(latent_channels=latent, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    vae.enable_slicing()
    encoders = (tiny_hunyuan_video15_text_encoders(text_dim, byt5_dim, seed) if text_encoders else
                dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")))
    pipe = HunyuanVideo15Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale), **encoders,
    )
    pipe.vision_num_semantic_tokens = 4  # image-embedding tokens in the joint sequence (729 at full size)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipelineSpec(
        pipe, "hunyuan_video15", text_len, text_dim, byt5_dim, text_len_2=byt5_len,
        defaults={"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 8},
    )


def build_tiny_pipeline(name: str, seed: int = 0) -> TinyPipelineSpec:
    """Build one of :data:`TINY_MODELS`."""
    if name == "tiny-cogvideox":
        return build_tiny_cogvideox(seed, "1.0")
    if name == "tiny-cogvideox-1.5":
        return build_tiny_cogvideox(seed, "1.5")
    if name == "tiny-hunyuan":
        return build_tiny_hunyuan(seed)
    if name == "tiny-opensora":
        return build_tiny_opensora(seed)
    if name == "tiny-wan":
        return build_tiny_wan(seed)
    if name == "tiny-wan2.2":
        return build_tiny_wan(seed, experts=2)
    if name == "tiny-hunyuanvideo-1.5":
        return build_tiny_hunyuan_video15(seed)
    if name in TINY_VAR_MODELS:
        raise ValueError(f"{name!r} is a class-conditional VAR model: build it with build_tiny_var()")
    raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(TINY_MODELS)}")


def build_tiny_var(seed: int = 0, *, patch_nums: tuple[int, ...] = TINY_VAR_PATCH_NUMS, depth: int = 2) -> Any:
    """A :class:`~diffusers_attn.pipelines.var.VARPipeline` with a 2-block, 2-head x 64 transformer (1000 classes,
    64-entry codebook) and a 32-channel VQVAE with 8x downsampling: 64x64 images from ``patch_nums`` (1, 2, 3, 4,
    6, 8), so LiteVAR has maskable scales 3-5. Random weights; every weight matrix is rescaled to a visible scale
    (random init leaves the adaLN gates near zero, which would make attention irrelevant to the output)."""
    torch.manual_seed(seed)
    tr = VARTransformer(depth=depth, embed_dim=128, num_heads=2, vocab_size=64, z_channels=8, patch_nums=patch_nums)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if p.ndim >= 2 and "emb" not in n:
                p.normal_(std=0.5 / p.shape[-1] ** 0.5)
            elif "bias" in n:
                p.normal_(std=0.05)
    torch.manual_seed(seed + 1)
    vq = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_nums=patch_nums)
    pipe = VARPipeline(tr.eval(), vq.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe
