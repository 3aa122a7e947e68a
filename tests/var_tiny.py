"""Tiny VAR configurations for the CPU tests."""

from __future__ import annotations

import torch

from diffusers_attn.pipelines.var import VQVAE, VARPipeline, VARTransformer

T1 = dict(patch_nums=(1, 2, 3))
T2 = dict(patch_nums=(1, 2, 3, 4, 6))


def tiny_transformer(patch_nums=(1, 2, 3), depth: int = 2, shared_aln: bool = False, seed: int = 0) -> VARTransformer:
    torch.manual_seed(seed)
    tr = VARTransformer(depth=depth, embed_dim=128, num_heads=2, vocab_size=64, z_channels=8, patch_nums=patch_nums,
                        shared_aln=shared_aln)
    # Random init leaves adaLN gates small but nonzero; give every parameter a visible scale so the blocks matter.
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if p.ndim >= 2 and "emb" not in n:
                p.normal_(std=0.5 / p.shape[-1] ** 0.5)
            elif "bias" in n:
                p.normal_(std=0.05)
    return tr.eval()


def tiny_vqvae(patch_nums=(1, 2, 3), seed: int = 1) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=patch_nums).eval()


def tiny_pipe(patch_nums=(1, 2, 3), **kw) -> VARPipeline:
    pipe = VARPipeline(tiny_transformer(patch_nums, **kw), tiny_vqvae(patch_nums))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_teacher_inputs(pipe: VARPipeline, B: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random token ids per scale and their teacher-forcing inputs (B, L - 1, Cvae)."""
    g = torch.Generator().manual_seed(seed)
    V = pipe.transformer.vocab_size
    ids = [torch.randint(0, V, (B, pn * pn), generator=g) for pn in pipe.transformer.patch_nums]
    return ids, pipe.vqvae.quantize.idx_to_var_input(ids)


@torch.no_grad()
def incremental_logits(tr: VARTransformer, labels: torch.Tensor, teacher: torch.Tensor, cfg_batch: bool = False) -> list[torch.Tensor]:
    """Per-scale logits from the KV-cached incremental forward fed with the teacher inputs."""
    cond = tr.class_cond(labels)
    lvl_pos = tr.lvl_pos()
    x = tr.first_input(cond)
    out = []
    tr.kv_caching(True)
    try:
        for si, (bg, ed) in enumerate(tr.begin_ends):
            h = tr.run_blocks(x, cond, None, scale_idx=si, cfg_batch=cfg_batch)
            out.append(tr.get_logits(h, cond))
            if si + 1 < len(tr.begin_ends):
                nb, ne = tr.begin_ends[si + 1]
                x = tr.word_embed(teacher[:, nb - 1 : ne - 1]) + lvl_pos[:, nb:ne]
    finally:
        tr.kv_caching(False)
    return out
