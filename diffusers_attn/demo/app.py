"""Gradio side-by-side page: dense vs an accelerated method, same seed (``diffusers-attn demo``).

The page is built from the method registry (:mod:`diffusers_attn.demo.methods`): every registered method gets its
own group of knobs, shown while it is selected. Runs are queued with concurrency 1 (one GPU, sequential dense and
accelerated runs); bad input comes back as a readable message in the page and the app keeps serving.
"""

from __future__ import annotations

import random
from typing import Any

from .methods import METHODS, DemoInputError
from .runner import DemoRequest, DemoRunner

from ..reference_models import DEFAULT_PROMPT  # the default model (ref-cogvideox) knows its caption grammar
from ..reference_models.var import DEFAULT_CLASS_LABELS
FIXED_INPUTS = ("model", "method", "prompt", "negative_prompt", "embeddings", "seed", "randomize_seed", "steps",
                "frames", "height", "width", "warmup")


def knob_order() -> list[tuple[str, str]]:
    """(method key, knob name) of the knob inputs, in the order they follow :data:`FIXED_INPUTS` in the API."""
    return [(m.key, k.name) for m in METHODS.values() for k in m.knobs]


def _model_choices(method_key: str) -> list[str]:
    method = METHODS[method_key]
    return list(method.models) or list(dict.fromkeys(m for meth in METHODS.values() for m in meth.models))


def _plot_label(method_key: str) -> str:
    return METHODS[method_key].plot_label or "Pattern per layer (rows) and head (columns)"


def build_demo(runner: DemoRunner | None = None, *, default_method: str = "rainfusion"):
    """The ``gr.Blocks`` page (not launched). ``runner`` defaults to a :class:`DemoRunner` on the best device."""
    import gradio as gr

    runner = runner or DemoRunner()
    if default_method not in METHODS:
        default_method = next(iter(METHODS))
    order = knob_order()

    def compare(*values: Any, progress=gr.Progress()):
        fixed = dict(zip(FIXED_INPUTS, values[: len(FIXED_INPUTS)]))
        knob_vals = values[len(FIXED_INPUTS):]
        method_key = fixed["method"]
        knobs = {name: val for (mk, name), val in zip(order, knob_vals) if mk == method_key}
        seed = fixed["seed"]
        if fixed["randomize_seed"]:
            seed = random.randint(0, 2**31 - 1)
        emb = fixed["embeddings"]
        req = DemoRequest(
            model=(fixed["model"] or "").strip(), method=method_key, prompt=fixed["prompt"] or "",
            negative_prompt=fixed["negative_prompt"] or "",
            embeddings_path=(emb if isinstance(emb, str) else getattr(emb, "name", None)) if emb else None,
            knobs=knobs, seed=seed, steps=fixed["steps"], frames=fixed["frames"], height=fixed["height"],
            width=fixed["width"], warmup=bool(fixed["warmup"]),
        )
        try:
            res = runner.run(req, progress=lambda frac, desc: progress(frac, desc=desc))
        except DemoInputError as e:
            raise gr.Error(str(e), title="Cannot run this comparison") from None
        vid = not res.is_image
        return (
            gr.update(value=res.dense_video if vid else None, visible=vid),
            gr.update(value=res.accel_video if vid else None, visible=vid),
            gr.update(value=None if vid else res.dense_video, visible=not vid),
            gr.update(value=None if vid else res.accel_video, visible=not vid),
            res.dense_caption,
            res.accel_caption,
            res.summary_md,
            res.pattern_plot,
            res.metrics,
            seed,
        )

    with gr.Blocks(title="diffusers-attn: dense vs accelerated") as demo:
        gr.Markdown(
            "# diffusers-attn — dense vs accelerated attention\n"
            "Runs the pipeline twice with the same seed (dense, then the chosen method) and compares latency, "
            "fidelity to dense and what the attention actually computed. The default `ref-*` models are small "
            "models trained offline on procedural moving shapes (prompts: `<colour> <shape> <motion> over "
            "<background>`); the `tiny-*` models have random weights: their figures check the plumbing only. "
            "CPU timings say nothing about GPU speed."
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative_prompt")
                embeddings = gr.File(label="Prompt embeddings (.pt dict of pipeline kwargs, optional)",
                                     file_types=[".pt", ".pth"], type="filepath", height=110)
            with gr.Column(scale=1):
                method = gr.Dropdown(label="Method", choices=[(m.label, m.key) for m in METHODS.values()],
                                     value=default_method, elem_id="method")
                model = gr.Dropdown(label="Model (built-in tiny model, hub id or local folder)",
                                    choices=_model_choices(default_method), value=_model_choices(default_method)[0],
                                    allow_custom_value=True, elem_id="model")
                method_info = gr.Markdown(METHODS[default_method].description)
        knob_groups: dict[str, Any] = {}
        knob_inputs: list[Any] = []
        for meth in METHODS.values():
            with gr.Group(visible=meth.key == default_method) as group:
                with gr.Row():
                    for k in meth.knobs:
                        eid = f"knob-{meth.key}-{k.name}"
                        if k.kind == "bool":
                            comp = gr.Checkbox(label=k.label, value=bool(k.default), info=k.info or None,
                                               elem_id=eid)
                        elif k.kind == "choice":
                            comp = gr.Dropdown(label=k.label, choices=list(k.choices), value=k.default,
                                               info=k.info or None, elem_id=eid)
                        else:
                            comp = gr.Slider(label=k.label, minimum=k.minimum, maximum=k.maximum, value=k.default,
                                             step=k.step or (1 if k.kind == "int" else 0.01), info=k.info or None,
                                             elem_id=eid)
                        knob_inputs.append(comp)
            knob_groups[meth.key] = group
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
            randomize = gr.Checkbox(label="Random seed", value=False)
            steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=16, step=1, elem_id="steps")
            frames = gr.Slider(label="Frames", minimum=1, maximum=129, value=9, step=4, elem_id="frames")
            height = gr.Slider(label="Height", minimum=32, maximum=1280, value=32, step=16, elem_id="height")
            width = gr.Slider(label="Width", minimum=32, maximum=1280, value=32, step=16, elem_id="width")
            warmup = gr.Checkbox(label="Warm-up run before timing", value=True)
        run_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
        with gr.Row(equal_height=True):
            with gr.Column():
                dense_video = gr.Video(label="Dense", autoplay=True, loop=True, height=360, elem_id="dense-video")
                dense_image = gr.Image(label="Dense", visible=False, elem_id="dense-image")
                dense_caption = gr.Markdown(elem_id="dense-latency")
            with gr.Column():
                accel_video = gr.Video(label="Accelerated", autoplay=True, loop=True, height=360,
                                       elem_id="accel-video")
                accel_image = gr.Image(label="Accelerated", visible=False, elem_id="accel-image")
                accel_caption = gr.Markdown(elem_id="accel-latency")
        summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            plot = gr.Image(label=_plot_label(default_method), type="numpy", elem_id="pattern-plot")
            metrics = gr.JSON(label="All figures")
        seed_used = gr.Number(label="Seed used", precision=0, interactive=False)

        def on_method(key: str):
            meth = METHODS[key]
            choices = _model_choices(key)
            class_labels = meth.conditioning == "class_labels"
            return [
                # ref-var (the default VAR) has 36 shape classes; tiny-var takes any id < 1000
                gr.update(label="Class labels (ref-var: 0-35, tiny-var: ImageNet ids)" if class_labels else "Prompt",
                          value=DEFAULT_CLASS_LABELS if class_labels else DEFAULT_PROMPT),
                gr.update(visible=not class_labels),
                gr.update(visible=not class_labels),
                gr.update(choices=choices, value=choices[0] if choices else None),
                meth.description,
                *[gr.update(visible=k == key) for k in knob_groups],
                *[gr.update(visible=not class_labels) for _ in video_only],  # VAR: fixed scales and size
                gr.update(label=_plot_label(key)),
            ]

        video_only = [steps, frames, height, width]
        method.change(on_method, inputs=method,
                      outputs=[prompt, negative, embeddings, model, method_info, *knob_groups.values(), *video_only,
                               plot],
                      api_visibility="private")
        run_btn.click(
            compare,
            inputs=[model, method, prompt, negative, embeddings, seed, randomize, steps, frames, height, width,
                    warmup, *knob_inputs],
            outputs=[dense_video, accel_video, dense_image, accel_image, dense_caption, accel_caption, summary, plot,
                     metrics, seed_used],
            api_name="compare",
            concurrency_limit=1,
            concurrency_id="device",
        )
    demo.queue(max_size=8, default_concurrency_limit=1)
    return demo


def launch_demo(host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                runner: DemoRunner | None = None, **launch_kwargs: Any):
    """Build and launch the page. Binds to loopback unless ``host`` says otherwise; ``share`` opens a public link."""
    demo = build_demo(runner)
    demo.launch(server_name=host, server_port=port, share=share, **launch_kwargs)
    return demo
