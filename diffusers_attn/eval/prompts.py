"""Prompt suites for evaluation runs.

The VBench prompt suite is vendored (``data/vbench/``, Apache-2.0, see ``ATTRIBUTION.md`` there). Suites:

* ``all``: the 946 VBench prompts (``VBench_full_info.json`` order).
* ``quick``: the first :data:`QUICK_PER_DIMENSION` prompts of each of the 16 dimensions, in file order,
  de-duplicated (44 prompts): a fixed, documented subset for quick paired-fidelity runs.
* ``dimension:NAME``: the prompts tagged with one VBench dimension (e.g. ``dimension:subject_consistency``).
* ``reference``: :data:`REFERENCE_SUITE_SIZE` captions of the trained reference models' grammar
  (``diffusers_attn.reference_models.data``), evenly spaced over its 225 captions: the default for ``ref-*`` models,
  which only know those words.
* ``file:PATH``: one prompt per line from your own file (e.g. a GPT-enhanced list or a Penguin copy you are
  licensed to use; those are not vendored here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data" / "vbench"
FULL_INFO = DATA_DIR / "VBench_full_info.json"
QUICK_PER_DIMENSION = 4
REFERENCE_SUITE_SIZE = 8

DIMENSIONS = (
    "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects", "human_action", "color",
    "spatial_relationship", "scene", "appearance_style", "temporal_style", "overall_consistency",
)


@dataclass(frozen=True)
class Prompt:
    text: str
    dimensions: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def vbench_prompts() -> tuple[Prompt, ...]:
    """All 946 VBench prompts with their dimension tags."""
    data = json.loads(FULL_INFO.read_text(encoding="utf-8"))
    return tuple(Prompt(d["prompt_en"], tuple(d["dimension"])) for d in data)


def load_suite(spec: str) -> list[Prompt]:
    """Prompts of a suite (see the module docstring). Raises ``ValueError`` naming the valid forms."""
    if spec == "all":
        return list(vbench_prompts())
    if spec == "quick":
        picked: dict[str, Prompt] = {}
        order = [dim for p in vbench_prompts() for dim in p.dimensions]
        for dim in dict.fromkeys(order):
            for p in [p for p in vbench_prompts() if dim in p.dimensions][:QUICK_PER_DIMENSION]:
                picked.setdefault(p.text, p)
        return list(picked.values())
    if spec == "reference":
        # Deferred: the reference_models package loads torch and diffusers, which listing the other suites (and
        # the CLI parser, which imports this module) does without.
        from ..reference_models.data import caption_vocabulary

        vocab = caption_vocabulary()
        step = len(vocab) // REFERENCE_SUITE_SIZE
        return [Prompt(vocab[i * step]) for i in range(REFERENCE_SUITE_SIZE)]
    if spec.startswith("dimension:"):
        dim = spec.split(":", 1)[1]
        if dim not in DIMENSIONS:
            raise ValueError(f"unknown VBench dimension {dim!r}; known: {', '.join(DIMENSIONS)}")
        return [p for p in vbench_prompts() if dim in p.dimensions]
    if spec.startswith("file:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"prompt file {path} has no prompts")
        return [Prompt(t) for t in dict.fromkeys(texts)]
    raise ValueError(f"unknown prompt suite {spec!r}; use all | quick | reference | dimension:NAME | file:PATH")


def video_name(prompt: str, index: int) -> str:
    """VBench's file stem ``{prompt}-{index}`` (prompt verbatim); refuses names a file system cannot hold."""
    if "/" in prompt or "\0" in prompt or "\\" in prompt:
        raise ValueError(f"prompt {prompt!r} contains a path separator; VBench names files after the prompt")
    name = f"{prompt}-{index}"
    if len(name.encode()) > 250:
        raise ValueError(f"prompt too long for a file name ({len(name.encode())} bytes): {prompt[:60]!r}...")
    return name
