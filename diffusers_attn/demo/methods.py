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

The built-in entries (RainFusion, LiteVAR, FEAT) are in :mod:`.builtin_methods`, registered when the
:mod:`diffusers_attn.demo` package is imported.

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
        """Every knob's value (its default when not given); a name that is not a knob is refused."""
        unknown = sorted(set(values) - {k.name for k in self.knobs})
        if unknown:
            raise DemoInputError(f"{self.label}: unknown setting(s) {unknown}; its settings are "
                                 f"{[k.name for k in self.knobs]}")
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
