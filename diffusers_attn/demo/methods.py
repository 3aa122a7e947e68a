"""Methods the side-by-side demo can compare against dense, as a registry.

Each entry says which knobs the page shows for it, how to build the function that installs the method on a loaded
pipeline, and whether the model is conditioned on a prompt or on class labels (VAR). A new method (FEAT, LiteVAR)
is added to the demo by one :func:`register_method` call, with no change to the page code::

    register_method(DemoMethod(
        key="rf-fixed", label="RainFusion, fixed sparsity",
        knobs=(Knob("sparsity", "Sparsity", "float", 0.5, 0.0, 0.95, 0.05),),
        make_apply=lambda knobs, loaded: (
            lambda pipe: apply_rainfusion(pipe, RainFusionConfig(sparsity=knobs["sparsity"]))),
    ))

The built-in FEAT and LiteVAR entries are in :mod:`.builtin_methods`.

A VAR-style method sets ``conditioning="class_labels"`` and a ``load`` function returning a
:class:`~diffusers_attn.compare.LoadedPipeline` whose ``prompt_kwargs`` parses the class-label text
(``"207, 360"``) into its pipeline's arguments; the page then shows a class-label box instead of the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..compare import LoadedPipeline


class DemoInputError(ValueError):
    """Bad input from the page: shown to the user as a readable message."""


@dataclass(frozen=True)
class Knob:
    """One method setting shown in the page.

    Args:
        name: Keyword the method's ``make_apply`` receives.
        label: Text shown in the page.
        kind: ``"float"`` (slider), ``"int"`` (slider with integer steps), ``"bool"`` (checkbox) or ``"choice"``.
        default: Initial value.
        minimum / maximum / step: Range of ``float``/``int`` knobs (checked again on the server).
        choices: Options of a ``choice`` knob.
        info: One line of help under the control.
        unavailable: ``(value, reason)`` pairs of values this host cannot run (left out of ``choices``; asking
            for one gives ``reason`` instead of a bare "not one of").
    """

    name: str
    label: str
    kind: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    info: str = ""
    unavailable: tuple[tuple[Any, str], ...] = ()

    def validate(self, value: Any) -> Any:
        """The value converted to the knob's type; :class:`DemoInputError` when it is out of range."""
        if self.kind == "bool":
            return bool(value)
        if self.kind == "choice":
            for bad, reason in self.unavailable:
                if value == bad:
                    raise DemoInputError(f"{self.label}: {value!r} is not available here: {reason}")
            if value not in self.choices:
                raise DemoInputError(f"{self.label}: {value!r} is not one of {list(self.choices)}")
            return value
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise DemoInputError(f"{self.label}: expected a number, got {value!r}") from None
        if not math.isfinite(num):
            raise DemoInputError(f"{self.label}: expected a finite number, got {value!r}")
        if (self.minimum is not None and num < self.minimum) or (self.maximum is not None and num > self.maximum):
            raise DemoInputError(f"{self.label} must be in [{self.minimum}, {self.maximum}], got {value!r}")
        if self.kind == "int":
            if num != int(num):
                raise DemoInputError(f"{self.label}: expected a whole number, got {value!r}")
            return int(num)
        return num


@dataclass(frozen=True)
class DemoMethod:
    """A method the demo can run against dense (see the module docstring).

    Args:
        key: Stable id (API value of the method dropdown).
        label: Text in the dropdown.
        knobs: Settings shown for this method.
        make_apply: ``(knob values, loaded pipeline) -> apply(pipe)``; ``apply`` installs the method in place (it is
            removed with :func:`~diffusers_attn.install.remove_attention_acceleration` after the run).
        conditioning: ``"prompt"`` or ``"class_labels"``.
        models: Model choices offered first for this method (any hub id / path can still be typed).
        load: ``(model, device, dtype) -> LoadedPipeline``; default :func:`~diffusers_attn.compare.load_pipeline`.
        description: Shown under the dropdown.
        describe: ``(knob values, loaded pipeline) -> dict``: the full method config, recorded in evaluation
            manifests (``diffusers-attn eval sample``).
        remove: ``remove(pipe)`` undoing ``apply`` (default
            :func:`~diffusers_attn.install.remove_attention_acceleration`).
        plot: ``(AttentionStats, knob values, loaded pipeline) -> RGB array or None``: the figure under the outputs
            (default: :func:`~diffusers_attn.demo.runner.pattern_plot`, per layer and head); ``plot_label``
            is its caption.
        wants_call: ``apply`` takes a second argument, a :class:`ApplyCall` (the generation's keyword arguments,
            seed, device, progress): methods that prepare on the same input (FEAT's short distillation).

    ``apply`` may return a JSON-friendly dict (what the preparation did); it is shown as ``method_report`` in the
    figures.
    """

    key: str
    label: str
    knobs: tuple[Knob, ...]
    make_apply: Callable[[dict[str, Any], LoadedPipeline], Callable[[Any], None]]
    conditioning: str = "prompt"
    models: tuple[str, ...] = ()
    load: Callable[[str, torch.device, torch.dtype], LoadedPipeline] | None = None
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    describe: Callable[[dict[str, Any], LoadedPipeline], dict[str, Any]] | None = None
    remove: Callable[[Any], Any] | None = None
    plot: Callable[[Any, dict[str, Any], LoadedPipeline], Any] | None = None
    wants_call: bool = False
    plot_label: str = ""

    def validate_knobs(self, values: dict[str, Any]) -> dict[str, Any]:
        return {k.name: k.validate(values.get(k.name, k.default)) for k in self.knobs}


@dataclass
class ApplyCall:
    """What a ``wants_call`` method's ``apply(pipe, call)`` receives."""

    kwargs: dict[str, Any]  # the pipeline call of the comparison (prompt embeddings, steps, size ...)
    seed: int
    device: torch.device
    progress: Callable[[str], None]  # one line of status for the page


METHODS: dict[str, DemoMethod] = {}


def register_method(method: DemoMethod) -> DemoMethod:
    """Add (or replace) a method in the demo's dropdown."""
    if method.conditioning not in ("prompt", "class_labels"):
        raise ValueError(f"conditioning must be 'prompt' or 'class_labels', got {method.conditioning!r}")
    METHODS[method.key] = method
    return method


def get_method(key: str) -> DemoMethod:
    try:
        return METHODS[key]
    except KeyError:
        raise DemoInputError(f"unknown method {key!r}; available: {', '.join(METHODS)}") from None


def _rainfusion_config(knobs: dict[str, Any], loaded: LoadedPipeline):
    from ..processors.rainfusion import RainFusionConfig

    # Same rule as `diffusers-attn compare`: the tiny models need small blocks and no token floor for the sparse
    # path to run at all.
    return RainFusionConfig(
        sparsity=knobs["sparsity"],
        dense_steps=knobs["dense_steps"],
        dense_layers=knobs["dense_layers"],
        arm_threshold=knobs["arm_threshold"],
        min_video_tokens=0 if loaded.tiny else 4096,
        block_m=16 if loaded.tiny else 128,
        block_n=16 if loaded.tiny else 64,
    )


def _rainfusion_apply(knobs: dict[str, Any], loaded: LoadedPipeline) -> Callable[[Any], None]:
    from ..processors.rainfusion import apply_rainfusion

    config = _rainfusion_config(knobs, loaded)
    return lambda pipe: apply_rainfusion(pipe, config)


def _rainfusion_describe(knobs: dict[str, Any], loaded: LoadedPipeline) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(_rainfusion_config(knobs, loaded))


def _register_builtin() -> None:
    from ..pipelines.tiny import TINY_MODELS
    from ..reference_models import REFERENCE_MODELS

    register_method(DemoMethod(
        key="rainfusion",
        label="RainFusion (sparse attention)",
        knobs=(
            Knob("sparsity", "Sparsity", "float", 0.75, 0.0, 0.95, 0.05,
                 info="share of video keys skipped (0 = stock attention)"),
            Knob("dense_steps", "Dense warm-up (fraction of steps)", "float", 0.25, 0.0, 1.0, 0.05),
            Knob("dense_layers", "Dense first layers", "int", 1, 0, 8, 1),
            Knob("arm_threshold", "ARM threshold", "float", 0.9, 0.0, 1.0, 0.05,
                 info="a head keeps its best pattern only if it keeps this share of the sampled mass; else dense"),
        ),
        make_apply=_rainfusion_apply,
        describe=_rainfusion_describe,
        models=(*REFERENCE_MODELS, *TINY_MODELS),  # trained reference models first: they show real motion
        description="Per-head Spatial / Temporal / Textural block-sparse patterns chosen online (ARM).",
    ))


_register_builtin()

from . import builtin_methods as _builtin_methods  # noqa: E402,F401 - registers FEAT and LiteVAR
