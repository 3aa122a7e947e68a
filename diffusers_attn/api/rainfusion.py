"""``apply_rainfusion``: install RainFusion on a video pipeline or transformer."""

from __future__ import annotations

from typing import Any

from ..adapters import get_adapter
from ..context import AttentionContext
from ..install import install_method, pipeline_transformers, resolve_transformer
from ..methods.rainfusion import RainFusionConfig, RainFusionMethod


def apply_rainfusion(pipe_or_model: Any, config: RainFusionConfig | None = None) -> AttentionContext:
    """Install RainFusion sparse attention on a CogVideoX, HunyuanVideo, Open-Sora or Wan pipeline (or bare
    transformer). A pipeline with a second transformer (Wan 2.2 A14B's ``transformer_2``) gets it on both.

    Example::

        pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
        apply_rainfusion(pipe, RainFusionConfig(sparsity=0.75, dense_steps=0.25, dense_layers=1))
        video = pipe(prompt, num_frames=49).frames[0]
        print(get_attention_stats(pipe))
        remove_attention_acceleration(pipe)

    Applying again replaces the previous configuration. Returns the transformer's :class:`AttentionContext`.
    """
    config = config if config is not None else RainFusionConfig()
    if not isinstance(config, RainFusionConfig):
        raise TypeError(f"config must be a RainFusionConfig, got {type(config).__name__}")
    transformer, pipe = resolve_transformer(pipe_or_model)
    get_adapter(transformer, "video")  # unsupported model: say so before anything else
    if pipe is None and config.num_inference_steps is None:
        for name in ("dense_steps", "dense_tail_steps"):
            val = getattr(config, name)
            if isinstance(val, float) and val > 0:
                raise ValueError(
                    f"RainFusionConfig.{name}={val} is a fraction of the run, but a bare transformer does not know "
                    "the number of steps: pass the pipeline, set num_inference_steps, or give an int step count."
                )
    context = install_method(pipe_or_model, RainFusionMethod(config), num_inference_steps=config.num_inference_steps)
    for name, second in pipeline_transformers(pipe_or_model).items():
        if name == "transformer":
            continue
        # Wan 2.2 A14B: the low-noise expert gets its own method state and counts steps with the first, so dense
        # warm-up and the schedule refer to the whole run across the boundary switch.
        get_adapter(second, "video")
        ctx = install_method(second, RainFusionMethod(config), num_inference_steps=config.num_inference_steps,
                             pipeline=pipe)
        ctx.share_steps_with(context)
    return context
