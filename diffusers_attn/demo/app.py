"""Gradio side-by-side page: dense vs an accelerated method, same seed (``diffusers-attn demo``).

The page is built from the method registry (:mod:`diffusers_attn.demo.methods`): every registered method gets its
own group of knobs, shown while it is selected. Runs are queued with concurrency 1 (one GPU, sequential dense and
accelerated runs); bad input comes back as a readable message in the page and the app keeps serving.
"""

from __future__ import annotations

import os
import random
from typing import Any

from ..reference_models import DEFAULT_PROMPT  # the default model (ref-cogvideox) knows its caption grammar
from ..reference_models.var import DEFAULT_CLASS_LABELS
from .methods import METHODS, DemoInputError, Knob
from .runner import DemoRequest, DemoRunner

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


INTRO = (
    "# diffusers-attn — dense vs accelerated attention\n"
    "Runs the pipeline twice with the same seed (dense, then the chosen method) and compares latency, "
    "fidelity to dense and what the attention actually computed. The default `ref-*` models are small "
    "models trained offline on procedural moving shapes (prompts: `<colour> <shape> <motion> over "
    "<background>`); the `tiny-*` models have random weights: their figures check the plumbing only. "
    "CPU timings say nothing about GPU speed."
)
VIDEO_ONLY = ("steps", "frames", "height", "width")  # hidden for VAR: fixed scales and size


def import_gradio() -> Any:
    """Gradio with its usage analytics off (unless the user set ``GRADIO_ANALYTICS_ENABLED`` themselves): the
    variable is read when gradio is first imported."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def build_demo(runner: DemoRunner | None = None, *, default_method: str = "rainfusion"):
    """The ``gr.Blocks`` page (not launched). ``runner`` defaults to a :class:`DemoRunner` on the best device."""
    gr = import_gradio()

    runner = runner or DemoRunner()
    if default_method not in METHODS:
        default_method = next(iter(METHODS))
    # delete_cache: Gradio's copies of the outputs older than an hour go, checked every 30 minutes
    with gr.Blocks(title="diffusers-attn: dense vs accelerated", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        inputs = _request_inputs(gr, default_method)
        knob_groups, knob_inputs = _knob_groups(gr, default_method)
        inputs.update(_run_settings(gr))
        run_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
        outputs = _result_outputs(gr, default_method)
        inputs["method"].change(
            _on_method(gr, list(knob_groups)), inputs=inputs["method"],
            outputs=[inputs[k] for k in ("prompt", "negative_prompt", "embeddings", "model", "method_info")]
            + [*knob_groups.values(), *(inputs[k] for k in VIDEO_ONLY), outputs["plot"]],
            api_visibility="private",
        )
        run_btn.click(
            _on_compare(gr, runner),
            inputs=[*(inputs[k] for k in FIXED_INPUTS), *knob_inputs],
            outputs=list(outputs.values()),
            api_name="compare",
            concurrency_limit=1,
            concurrency_id="device",
        )
    demo.queue(max_size=8, default_concurrency_limit=1)
    return demo


def _request_inputs(gr: Any, default_method: str) -> dict[str, Any]:
    """Prompt (or class labels), negative prompt, embeddings file; method, model and the method's description."""
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
    return {"prompt": prompt, "negative_prompt": negative, "embeddings": embeddings, "method": method,
            "model": model, "method_info": method_info}


def _knob_groups(gr: Any, default_method: str) -> tuple[dict[str, Any], list[Any]]:
    """One group of controls per registered method (visible while it is selected), and all knob inputs in
    :func:`knob_order`."""
    groups: dict[str, Any] = {}
    knob_inputs: list[Any] = []
    for meth in METHODS.values():
        with gr.Group(visible=meth.key == default_method) as group:
            with gr.Row():
                knob_inputs += [_knob_control(gr, meth.key, k) for k in meth.knobs]
        groups[meth.key] = group
    return groups, knob_inputs


def _knob_control(gr: Any, method_key: str, k: Knob) -> Any:
    eid = f"knob-{method_key}-{k.name}"
    if k.kind == "bool":
        return gr.Checkbox(label=k.label, value=bool(k.default), info=k.info or None, elem_id=eid)
    if k.kind == "choice":
        return gr.Dropdown(label=k.label, choices=list(k.choices), value=k.default, info=k.info or None, elem_id=eid)
    return gr.Slider(label=k.label, minimum=k.minimum, maximum=k.maximum, value=k.default,
                     step=k.step or (1 if k.kind == "int" else 0.01), info=k.info or None, elem_id=eid)


def _run_settings(gr: Any) -> dict[str, Any]:
    with gr.Row():
        return {
            "seed": gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed"),
            "randomize_seed": gr.Checkbox(label="Random seed", value=False),
            "steps": gr.Slider(label="Steps", minimum=1, maximum=100, value=16, step=1, elem_id="steps"),
            "frames": gr.Slider(label="Frames", minimum=1, maximum=129, value=9, step=4, elem_id="frames"),
            "height": gr.Slider(label="Height", minimum=32, maximum=1280, value=32, step=16, elem_id="height"),
            "width": gr.Slider(label="Width", minimum=32, maximum=1280, value=32, step=16, elem_id="width"),
            "warmup": gr.Checkbox(label="Warm-up run before timing", value=True),
        }


def _result_outputs(gr: Any, default_method: str) -> dict[str, Any]:
    """The comparison's outputs, in the order :func:`_on_compare` returns them."""
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
    return {"dense_video": dense_video, "accel_video": accel_video, "dense_image": dense_image,
            "accel_image": accel_image, "dense_caption": dense_caption, "accel_caption": accel_caption,
            "summary": summary, "plot": plot, "metrics": metrics, "seed_used": seed_used}


def _on_method(gr: Any, method_keys: list[str]):
    """Handler of the method dropdown: relabel the prompt box, show the method's knobs and models."""

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
            *[gr.update(visible=k == key) for k in method_keys],
            *[gr.update(visible=not class_labels) for _ in VIDEO_ONLY],  # VAR: fixed scales and size
            gr.update(label=_plot_label(key)),
        ]

    return on_method


def _on_compare(gr: Any, runner: DemoRunner):
    """Handler of the Compare button (the ``/compare`` API): :data:`FIXED_INPUTS` then the knobs in
    :func:`knob_order`."""
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

    return compare


def launch_demo(host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                runner: DemoRunner | None = None, **launch_kwargs: Any):
    """Build and launch the page. Binds to loopback unless ``host`` says otherwise; ``share`` opens a public link."""
    demo = build_demo(runner)
    demo.launch(server_name=host, server_port=port, share=share, **launch_kwargs)
    return demo
