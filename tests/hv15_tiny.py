"""Tiny HunyuanVideo-1.5 transformers and inputs for the CPU tests (real diffusers class, random weights)."""

from __future__ import annotations

import torch

TEXT_DIM, BYT5_DIM, IMAGE_DIM = 16, 8, 8


def make_hunyuan_video15(*, num_layers: int = 2, heads: int = 2, head_dim: int = 16, in_channels: int = 4):
    from diffusers import HunyuanVideo15Transformer3DModel

    rope = {16: (4, 6, 6), 8: (2, 2, 4), 12: (4, 4, 4)}[head_dim]
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
        num_layers=num_layers, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        text_embed_2_dim=BYT5_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=rope, target_size=64, task_type="t2v",
    ).eval()


def hunyuan_video15_inputs(batch: int = 2, frames: int = 5, height: int = 8, width: int = 8, *, text_len: int = 10,
                           byt5_len: int = 6, image_tokens: int = 3, valid=(4, 10), valid_2=(0, 3), image: bool = False,
                           seed: int = 1, in_channels: int = 4) -> dict:
    """Transformer kwargs with per-element prompt padding (``valid``: Qwen tokens, ``valid_2``: ByT5 tokens);
    ``image=True`` gives nonzero image embeddings (image-to-video: the image tokens join the sequence unmasked),
    else zeros (text-to-video: the model masks them)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text_len, dtype=torch.bool)
    mask2 = torch.zeros(batch, byt5_len, dtype=torch.bool)
    for b in range(batch):
        mask[b, : valid[b % len(valid)]] = True
        mask2[b, : valid_2[b % len(valid_2)]] = True
    img = torch.randn(batch, image_tokens, IMAGE_DIM, generator=g) if image else torch.zeros(batch, image_tokens,
                                                                                          IMAGE_DIM)
    return dict(
        hidden_states=torch.randn(batch, in_channels, frames, height, width, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(batch, byt5_len, BYT5_DIM, generator=g),
        encoder_attention_mask_2=mask2,
        image_embeds=img,
    )


def valid_conditioning(inputs: dict) -> list[int]:
    """Valid conditioning tokens per batch element; the model puts them first and the padding after them."""
    img = 0 if bool((inputs["image_embeds"] == 0).all()) else inputs["image_embeds"].shape[1]
    m1, m2 = inputs["encoder_attention_mask"], inputs["encoder_attention_mask_2"]
    return [img + int(m1[b].sum()) + int(m2[b].sum()) for b in range(m1.shape[0])]


def tiny_image_to_video_pipeline(seed: int = 0):
    """diffusers' HunyuanVideo15ImageToVideoPipeline on the tiny text-to-video pipeline's transformer, VAE and
    scheduler, plus a tiny SigLIP vision encoder (4 image tokens of width IMAGE_DIM): the image enters as unmasked
    conditioning tokens and, VAE-encoded, as the first latent frame in the input channels."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from diffusers_attn.pipelines.tiny import build_tiny_hunyuan_video15

    spec = build_tiny_hunyuan_video15(seed)
    t2v = spec.pipe
    torch.manual_seed(seed + 1)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=16)).eval()
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=t2v.transformer, vae=t2v.vae, scheduler=t2v.scheduler,
        text_encoder_2=None, tokenizer_2=None, guider=t2v.guider, image_encoder=encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )
    pipe.set_progress_bar_config(disable=True)
    return spec, pipe
