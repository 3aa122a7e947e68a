"""``VARPipeline``: class-conditional VAR sampling with the reference sampler semantics (the official VAR
repository, github.com/FoundationVision/VAR)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput

from .sampling import gumbel_softmax, sample_top_k_top_p
from .transformer import VARTransformer
from .vqvae import VQVAE

logger = logging.getLogger(__name__)

# Buffers in the official files that are functions of the config (or training statistics): not part of our
# state, filtered before the strict load.
_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "ema_vocab_hit_SV")


@dataclass
class VARPipelineOutput(BaseOutput):
    """``images``: PIL list, numpy (B, H, W, 3) or torch (B, 3, H, W) in [0, 1]. ``token_ids``: per scale (B, pn²)."""

    images: Any
    token_ids: list[torch.Tensor] | None = None


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model built for it."""


def _read_state_dict(src: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(src, Mapping):
        sd = dict(src)
    else:
        path = os.fspath(src)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(
            f"{src!r} is not a bare state_dict of tensors (the released VAR files are torch.save'd state_dicts)"
        )
    return sd


def load_official_state_dict(model: torch.nn.Module, src: str | os.PathLike | Mapping[str, torch.Tensor],
                             what: str = "checkpoint") -> None:
    """Strictly load an official VAR/VQVAE state dict into ``model`` (derived buffers filtered).

    Raises :class:`CheckpointMismatchError` listing every missing key, unexpected key and shape mismatch.
    """
    sd = {k: v for k, v in _read_state_dict(src).items() if k.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        def fmt(name: str, items: list[str]) -> str:
            more = f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
            return f"\n  {name} ({len(items)}): " + ", ".join(items[:20]) + more if items else ""

        cfg = getattr(model, "config", {})
        raise CheckpointMismatchError(
            f"{what} does not match {type(model).__name__}"
            f"(depth={cfg.get('depth', '-')}, patch_nums={cfg.get('patch_nums', '-')}):"
            + fmt("missing keys", missing) + fmt("unexpected keys", unexpected) + fmt("shape mismatches", shapes)
            + "\n(check the depth argument and that the file is a VAR/VQVAE checkpoint)"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen after a strict load; guards the meta-device construction
        raise CheckpointMismatchError(f"{what}: parameters left unloaded: {leftover[:10]}")


def _as_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


class VARPipeline(DiffusionPipeline):
    """VAR next-scale sampling. ``transformer``: :class:`VARTransformer`, ``vqvae``: :class:`VQVAE`.

    Loading the released weights (``FoundationVision/var`` on the Hub)::

        pipe = VARPipeline.from_var_checkpoint("vae_ch160v4096z32.pth", "var_d30.pth", depth=30).to("cuda")
        images = pipe([207, 360], autocast_dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(0))

    Precision: the official demo (``demo_sample.ipynb``) keeps the weights in fp32 and samples under
    ``torch.autocast("cuda", dtype=torch.float16)`` (its comment offers bfloat16 as the faster choice), with TF32
    matmuls allowed. fp32 weights with ``autocast_dtype=`` that dtype reproduce its computation; weights cast to
    bf16/fp16 (``torch_dtype=``) also round the weights and the residual stream, so tokens differ from the
    official sampler from the second scale on (fine for speed, not for comparisons with it).
    """

    # No model_cpu_offload_seq: the sampler calls the transformer's blocks directly (not ``forward``), which
    # accelerate's offload hooks would not see; diffusers then refuses enable_model_cpu_offload with a clear error.

    def __init__(self, transformer: VARTransformer, vqvae: VQVAE) -> None:
        super().__init__()
        if tuple(transformer.config.patch_nums) != tuple(vqvae.config.patch_nums):
            raise ValueError(
                f"transformer patch_nums {tuple(transformer.config.patch_nums)} != vqvae patch_nums "
                f"{tuple(vqvae.config.patch_nums)}"
            )
        tc, vc = transformer.config, vqvae.config
        if tc.vocab_size != vc.vocab_size or tc.z_channels != vc.z_channels:
            raise ValueError("transformer and vqvae disagree on vocab_size / z_channels")
        self.register_modules(transformer=transformer, vqvae=vqvae)

    @classmethod
    def from_var_checkpoint(
        cls,
        vae_checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        var_checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        depth: int,
        *,
        torch_dtype: torch.dtype | None = None,
        vqvae_config: dict[str, Any] | None = None,
        transformer_config: dict[str, Any] | None = None,
    ) -> "VARPipeline":
        """Build the released configuration for ``depth`` and load the official ``.pth`` files strictly.

        ``vqvae_config`` / ``transformer_config`` override config entries (tests use tiny synthetic files).
        ``torch_dtype``: cast the weights (default: fp32, as released). To reproduce the official sampler keep
        fp32 and pass ``autocast_dtype`` to the call instead (see the class docstring).
        """
        from .transformer import VAR_DEPTHS

        tcfg = dict(transformer_config or {})
        vcfg = dict(vqvae_config or {})
        # Build on the meta device (no random init, no second copy of the weights), then assign the loaded tensors.
        with torch.device("meta"):
            if depth in VAR_DEPTHS or not tcfg:
                transformer = VARTransformer.for_depth(depth, **tcfg)
            else:
                transformer = VARTransformer(depth=depth, **tcfg)
            vcfg.setdefault("patch_nums", tuple(transformer.config.patch_nums))
            vqvae = VQVAE(**vcfg)

        def name(src: Any, what: str) -> str:
            return f"{what} checkpoint {'<dict>' if isinstance(src, Mapping) else src}"

        load_official_state_dict(vqvae, vae_checkpoint, name(vae_checkpoint, "VQVAE"))
        load_official_state_dict(transformer, var_checkpoint, name(var_checkpoint, "VAR"))
        transformer.rebuild_derived_buffers()
        if torch_dtype is not None:
            # torch's own Module.to: diffusers' ModelMixin.to warns "should be kept in float32: []" on every dtype
            # cast, even when no module is to be kept in fp32 (there is none here).
            torch.nn.Module.to(transformer, dtype=torch_dtype)
            torch.nn.Module.to(vqvae, dtype=torch_dtype)
        return cls(transformer=transformer.eval(), vqvae=vqvae.eval())

    def _labels(self, class_labels: Any, batch_size: int | None, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
        nc = self.transformer.config.num_classes
        if class_labels is None:
            if batch_size is None:
                raise ValueError("give class_labels or batch_size (labels are then drawn uniformly)")
            # The reference's first draw from the generator.
            return torch.multinomial(torch.full((nc,), 1.0 / nc, device=device), batch_size, replacement=True,
                                     generator=generator)
        if isinstance(class_labels, int):
            labels = torch.full((batch_size or 1,), class_labels, dtype=torch.long)
        elif isinstance(class_labels, torch.Tensor):
            labels = class_labels.reshape(-1).long()
        else:
            labels = torch.tensor(list(class_labels), dtype=torch.long)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if (labels >= nc).any():
            raise ValueError(f"class labels must be < {nc} (negative = unconditional), got {labels.tolist()}")
        labels = torch.where(labels < 0, torch.full_like(labels, nc), labels)  # negative = null class
        return labels.to(device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        top_k: int = 900,
        top_p: float = 0.95,
        generator: torch.Generator | None = None,
        more_smooth: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
        return_token_ids: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> VARPipelineOutput | tuple:
        """Sample images for ``class_labels`` (ints in [0, 1000); negative = unconditional; None draws
        ``batch_size`` labels uniformly, the generator's first draw).

        Reference semantics: batch [cond; uncond] (cond first), CFG ramp ``t = guidance_scale * si / (SN - 1)``
        applied to the logits, top-k then top-p then one multinomial per scale (plus one exponential draw per
        scale with ``more_smooth``, a visualisation option never meant for FID), KV cache across scales.
        ``output_type``: ``"pil"``, ``"np"`` (B, H, W, 3) or ``"pt"`` (B, 3, H, W), in [0, 1]; ``"latent"`` returns
        ``f_hat``. ``autocast_dtype`` (``torch.float16`` or ``torch.bfloat16``, fp32 weights only): run sampling
        and decoding under ``torch.autocast`` in that dtype, as the official demo does (fp16 there); this is the
        setting that reproduces the official sampler's tokens, which weights cast to bf16 do not.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r}: use 'pil', 'np', 'pt' or 'latent'")
        if guidance_scale < 0 or top_k < 0 or not 0 <= top_p <= 1:
            raise ValueError("need guidance_scale >= 0, top_k >= 0 and 0 <= top_p <= 1")
        tr = self.transformer
        device = tr.device
        if autocast_dtype is not None:
            if autocast_dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"autocast_dtype must be torch.float16 or torch.bfloat16, got {autocast_dtype}")
            if tr.dtype != torch.float32:
                raise ValueError(
                    f"autocast_dtype needs fp32 weights (the official demo's setting), the model is {tr.dtype}: "
                    "load without torch_dtype"
                )
            amp = torch.autocast(device.type, dtype=autocast_dtype)
        else:
            amp = contextlib.nullcontext()
        with amp:
            return self._sample(class_labels, guidance_scale, top_k, top_p, generator, more_smooth, output_type,
                                return_dict, batch_size, return_token_ids)

    def _sample(self, class_labels, guidance_scale, top_k, top_p, generator, more_smooth, output_type, return_dict,
                batch_size, return_token_ids) -> VARPipelineOutput | tuple:
        tr, vq = self.transformer, self.vqvae
        device = tr.device
        labels = self._labels(class_labels, batch_size, generator, device)
        B = labels.shape[0]
        SN = len(tr.patch_nums)
        cond = tr.class_cond(torch.cat((labels, torch.full_like(labels, tr.num_classes))))  # [2B, C], cond first
        lvl_pos = tr.lvl_pos()
        x = tr.first_input(cond)
        HW = tr.patch_nums[-1]
        f_hat = torch.zeros(B, tr.Cvae, HW, HW, device=device, dtype=torch.float32)
        codebook = vq.quantize.embedding.weight
        token_ids = []
        cur_L = 0
        tr.kv_caching(True)
        try:
            for si in self.progress_bar(range(SN)):
                pn = tr.patch_nums[si]
                ratio = si / (SN - 1) if SN > 1 else 1.0
                cur_L += pn * pn
                h = tr.run_blocks(x, cond, None, scale_idx=si, cfg_batch=True)
                logits = tr.get_logits(h, cond)
                t = guidance_scale * ratio
                logits = (1 + t) * logits[:B] - t * logits[B:]
                idx = sample_top_k_top_p(logits, top_k, top_p, generator)
                token_ids.append(idx)
                if not more_smooth:
                    emb = codebook[idx].float()
                else:
                    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                    emb = gumbel_softmax(logits.mul(1 + ratio), tau, generator) @ codebook.float()
                emb = emb.transpose(1, 2).reshape(B, tr.Cvae, pn, pn)
                f_hat, nxt = vq.quantize.get_next_autoregressive_input(si, SN, f_hat, emb)
                if si != SN - 1:
                    nxt = nxt.view(B, tr.Cvae, -1).transpose(1, 2).to(tr.dtype)
                    x = tr.word_embed(nxt) + lvl_pos[:, cur_L : cur_L + tr.patch_nums[si + 1] ** 2]
                    x = x.repeat(2, 1, 1)
        finally:
            tr.kv_caching(False)
        if output_type == "latent":
            images: Any = f_hat
        else:
            img = vq.fhat_to_img(f_hat).float().add(1).mul(0.5)
            if output_type == "pt":
                images = img
            else:
                images = img.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = _as_pil(images)
        self.maybe_free_model_hooks()
        ids = token_ids if return_token_ids else None
        if not return_dict:
            return (images, ids)
        return VARPipelineOutput(images=images, token_ids=ids)
