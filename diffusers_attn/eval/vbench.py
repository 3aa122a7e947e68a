"""VBench on a sample folder, through the ``vbench`` package in its own virtual environment.

VBench 0.1.5 pins ``numpy<2`` and ``transformers==4.33.2``, which clash with current diffusers stacks, so it never
runs in this environment: :func:`setup_venv` creates a separate venv, :func:`run_vbench` calls its ``vbench``
executable as a subprocess (files in, ``*_eval_results.json`` out) and :func:`aggregate` reads the results.

* Modes: ``standard`` (``vbench_standard``: official prompts and ``{prompt}-{i}.mp4`` names; all 16 dimensions)
  and ``custom`` (``custom_input``: prompt from the file name; the six dimensions VBench documents for it).
* Weights: VBench reads ``$VBENCH_CACHE_DIR`` (default ``~/.cache/vbench``) and downloads what is missing; with a
  local weight folder we pass ``--load_ckpt_from_local True`` and point ``VBENCH_CACHE_DIR`` at it.
  :func:`doctor` lists which dimensions can run with the files present (paths follow ``vbench/utils.py``).
* One ``vbench evaluate`` call per arm and dimension (its CLI takes one ``--dimension``); each result lands in
  ``<out>/<arm>/<dimension>/`` and finished ones are not rerun.
* Aggregation follows ``scripts/cal_final_score.py`` (Min-Max normalisation, weight 0.5 for dynamic_degree,
  Quality = weighted mean of the 7 quality dimensions, Semantic of the 9 semantic ones, Total = (4 Q + S) / 5) but,
  instead of zero-filling missing dimensions, renormalises over the dimensions present and labels the result
  "partial (unofficial)" unless all 16 are there. Deltas are accelerated minus dense, per dimension.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .prompts import DIMENSIONS

QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency")
WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in DIMENSIONS}
NORMALIZE = {  # scripts/constant.py NORMALIZE_DIC (Min, Max)
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1
CUSTOM_INPUT_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                           "aesthetic_quality", "imaging_quality")
MODES = {"standard": "vbench_standard", "custom": "custom_input"}
VBENCH_PIN = "vbench==0.1.5"

# Files each dimension reads from the cache in local mode (vbench/utils.py::init_submodules, 0.1.5).
_CLIP_B = "clip_model/ViT-B-32.pt"
REQUIRED = {
    "subject_consistency": ["dino_model/facebookresearch_dino_main/", "dino_model/dino_vitbase16_pretrain.pth"],
    "background_consistency": [_CLIP_B],
    "temporal_flickering": [],
    "motion_smoothness": ["amt_model/amt-s.pth"],
    "dynamic_degree": ["raft_model/models/raft-things.pth"],
    "aesthetic_quality": ["clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"],
    "imaging_quality": ["pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"],
    "object_class": ["grit_model/grit_b_densecap_objectdet.pth"],
    "multiple_objects": ["grit_model/grit_b_densecap_objectdet.pth"],
    "human_action": ["umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth"],
    "color": ["grit_model/grit_b_densecap_objectdet.pth"],
    "spatial_relationship": ["grit_model/grit_b_densecap_objectdet.pth"],
    "scene": ["caption_model/tag2text_swin_14m.pth"],
    "appearance_style": [_CLIP_B],
    "temporal_style": ["ViCLIP/ViClip-InternVid-10M-FLT.pth"],
    "overall_consistency": ["ViCLIP/ViClip-InternVid-10M-FLT.pth"],
}
NEEDS_DETECTRON2 = ("object_class", "multiple_objects", "color", "spatial_relationship")


def default_cache_dir() -> Path:
    return Path(os.environ.get("VBENCH_CACHE_DIR", Path.home() / ".cache" / "vbench"))


def check_dimensions(dims: list[str], mode: str) -> list[str]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown VBench dimensions {unknown}; known: {', '.join(DIMENSIONS)}")
    if mode == "custom":
        bad = [d for d in dims if d not in CUSTOM_INPUT_DIMENSIONS]
        if bad:
            raise ValueError(f"custom-input mode supports {', '.join(CUSTOM_INPUT_DIMENSIONS)}; not {bad} "
                             "(use --mode standard with the VBench prompt suite)")
    return list(dict.fromkeys(dims))


# --- doctor ------------------------------------------------------------------------------------------------
@dataclass
class DimensionStatus:
    dimension: str
    runnable: bool
    missing: list[str]
    custom_input: bool


def doctor(cache_dir: str | Path | None = None, python: str | None = None) -> list[DimensionStatus]:
    """Which dimensions can run offline with the files in ``cache_dir``. With ``python`` (the VBench venv's
    interpreter) the four GRiT dimensions also need ``import detectron2`` to work there."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    detectron_ok: bool | None = None
    out = []
    for dim in DIMENSIONS:
        missing = [rel for rel in REQUIRED[dim]
                   if not ((cache / rel).is_dir() if rel.endswith("/") else (cache / rel).is_file())]
        if dim in NEEDS_DETECTRON2:
            if python is None:
                missing.append("detectron2 (not checked: pass the VBench venv)")
            else:
                if detectron_ok is None:
                    detectron_ok = subprocess.run([python, "-c", "import detectron2"], capture_output=True,
                                                  timeout=120).returncode == 0
                if not detectron_ok:
                    missing.append("detectron2 (install it from git in the VBench venv)")
        out.append(DimensionStatus(dim, not missing, missing, dim in CUSTOM_INPUT_DIMENSIONS))
    return out


def format_doctor(statuses: list[DimensionStatus], cache_dir: str | Path) -> str:
    ok = [s.dimension for s in statuses if s.runnable]
    lines = [f"VBench weights in {cache_dir}: {len(ok)}/{len(statuses)} dimensions can run offline"]
    for s in statuses:
        mark = "ok     " if s.runnable else "MISSING"
        extra = "" if s.runnable else ": " + "; ".join(s.missing)
        lines.append(f"  {mark} {s.dimension}{' (custom-input ok)' if s.custom_input else ''}{extra}")
    return "\n".join(lines)


# --- venv and runner ---------------------------------------------------------------------------------------
def setup_commands(venv: str | Path) -> list[list[str]]:
    venv = Path(venv)
    return [[sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", VBENCH_PIN]]


def setup_venv(venv: str | Path, dry_run: bool = False, log: Callable[[str], None] = print) -> None:
    """Create the separate VBench venv (needs PyPI; detectron2 for the GRiT dimensions is a manual step)."""
    for cmd in setup_commands(venv):
        log("$ " + " ".join(cmd))
        if not dry_run:
            subprocess.run(cmd, check=True)


def find_vbench(venv: str | Path | None = None, exe: str | Path | None = None) -> Path:
    cand = Path(exe) if exe else (Path(venv) / "bin" / "vbench" if venv else None)
    if cand is None:
        found = shutil.which("vbench")
        if not found:
            raise FileNotFoundError("no vbench executable: pass --venv DIR (made by `diffusers-attn eval "
                                    "vbench-setup --venv DIR`) or --vbench PATH")
        cand = Path(found)
    if not cand.is_file() or not os.access(cand, os.X_OK):
        raise FileNotFoundError(f"vbench executable {cand} does not exist or is not executable; create the venv "
                                "with `diffusers-attn eval vbench-setup --venv DIR`")
    return cand


def result_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_eval_results.json")) if folder.is_dir() else []


def run_vbench(samples: str | Path, dims: list[str], *, mode: str = "standard", out: str | Path | None = None,
               venv: str | Path | None = None, exe: str | Path | None = None, cache_dir: str | Path | None = None,
               local: bool = True, arms: list[str] | None = None, log: Callable[[str], None] = print,
               timeout: float | None = None) -> Path:
    """Evaluate each arm's ``videos/`` folder on ``dims``; returns the results folder."""
    dims = check_dimensions(dims, mode)
    samples = Path(samples)
    manifest = samples / "manifest.json"
    if arms is None:
        if not manifest.is_file():
            raise FileNotFoundError(f"{samples} has no manifest.json; pass --arms or run `eval sample` first")
        arms = json.loads(manifest.read_text())["arms"]
    if mode == "standard" and manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("suite") not in (None, "all") or int(m.get("videos_per_prompt", 5)) < 5:
            log(f"warning: standard mode expects the full VBench suite with 5 videos per prompt; this run sampled "
                f"suite {m.get('suite')!r} with {m.get('videos_per_prompt')} per prompt, so VBench will warn about "
                "missing videos and its scores cover only what was sampled (custom mode avoids this)")
    exe_path = find_vbench(venv, exe)
    out_dir = Path(out) if out else samples / "vbench"
    env = dict(os.environ)
    if cache_dir:
        env["VBENCH_CACHE_DIR"] = str(Path(cache_dir).resolve())
    # `vbench evaluate` re-launches `python -m torch.distributed.run`: that `python` must be the venv's.
    env["PATH"] = f"{exe_path.parent}{os.pathsep}{env.get('PATH', '')}"
    for arm in arms:
        videos = samples / arm / "videos"
        if not videos.is_dir() or not any(videos.glob("*.mp4")):
            raise FileNotFoundError(f"no videos in {videos}")
        for dim in dims:
            dest = out_dir / arm / dim
            if result_files(dest):
                log(f"{arm}/{dim}: done already ({result_files(dest)[-1].name})")
                continue
            dest.mkdir(parents=True, exist_ok=True)
            cmd = [str(exe_path), "evaluate", "--videos_path", str(videos.resolve()), "--dimension", dim,
                   "--mode", MODES[mode], "--output_path", str(dest.resolve())]
            if local:
                cmd += ["--load_ckpt_from_local", "True"]
            log("$ " + " ".join(cmd))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            (dest / "vbench.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0 or not result_files(dest):
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
                raise RuntimeError(f"vbench failed on {arm}/{dim} (exit {proc.returncode}); log {dest / 'vbench.log'}"
                                   f": {' | '.join(tail)}")
    return out_dir


# --- aggregation -------------------------------------------------------------------------------------------
def read_scores(folder: Path) -> dict[str, float]:
    """dimension -> raw score (element 0 of each entry) from every ``*_eval_results.json`` below ``folder``."""
    scores: dict[str, float] = {}
    for f in sorted(folder.rglob("*_eval_results.json")):
        data = json.loads(f.read_text())
        for dim, entry in data.items():
            if dim in DIMENSIONS:
                scores[dim] = float(entry[0] if isinstance(entry, (list, tuple)) else entry)
    return scores


def normalized(dim: str, raw: float) -> float:
    lo, hi = NORMALIZE[dim]
    return (raw - lo) / (hi - lo) * WEIGHT[dim]


def group_scores(scores: dict[str, float]) -> dict[str, Any]:
    """Quality / Semantic / Total over the dimensions present (weighted means of normalised scores)."""
    out: dict[str, Any] = {}
    for name, group in (("quality", QUALITY), ("semantic", SEMANTIC)):
        present = [d for d in group if d in scores]
        out[name] = (sum(normalized(d, scores[d]) for d in present) / sum(WEIGHT[d] for d in present)
                     if present else None)
        out[f"{name}_dimensions"] = len(present)
    q, s = out["quality"], out["semantic"]
    if q is not None and s is not None:
        out["total"] = (QUALITY_WEIGHT * q + SEMANTIC_WEIGHT * s) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    else:
        out["total"] = q if q is not None else s
    complete = all(d in scores for d in DIMENSIONS)
    out["label"] = "official (all 16 dimensions)" if complete else (
        f"partial (unofficial): renormalised over {len(scores)} of 16 dimensions")
    return out


def aggregate(results: str | Path, arms: list[str] | None = None, baseline: str = "dense") -> dict[str, Any]:
    """Per-arm scores and per-dimension deltas vs ``baseline`` (over dimensions both arms have)."""
    results = Path(results)
    arms = arms or sorted(p.name for p in results.iterdir() if p.is_dir())
    if baseline not in arms:
        raise ValueError(f"no {baseline!r} results in {results} (arms found: {arms})")
    per_arm = {arm: read_scores(results / arm) for arm in arms}
    report: dict[str, Any] = {"results": str(results), "baseline": baseline, "arms": {}}
    for arm, scores in per_arm.items():
        common = {d: v for d, v in scores.items() if d in per_arm[baseline]}
        entry = {"raw": scores, "normalized": {d: normalized(d, v) for d, v in scores.items()},
                 "scores": group_scores(common)}
        if arm != baseline:
            base = per_arm[baseline]
            entry["delta_raw"] = {d: scores[d] - base[d] for d in common}
            entry["delta_normalized"] = {d: normalized(d, scores[d]) - normalized(d, base[d]) for d in common}
            bs = group_scores({d: base[d] for d in common})
            entry["delta_scores"] = {k: (entry["scores"][k] - bs[k]) if entry["scores"][k] is not None else None
                                     for k in ("quality", "semantic", "total")}
            entry["missing_vs_baseline"] = sorted(set(base) - set(scores))
        report["arms"][arm] = entry
    return report


def format_aggregate(report: dict[str, Any]) -> str:
    base = report["baseline"]
    others = [a for a in report["arms"] if a != base]
    dims = [d for d in DIMENSIONS if d in report["arms"][base]["raw"]]
    head = "| dimension | " + base + " | " + " | ".join(f"{a} | delta" for a in others) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(others))]
    for d in dims:
        row = f"| {d} | {report['arms'][base]['raw'][d]:.4f} |"
        for a in others:
            e = report["arms"][a]
            row += (f" {e['raw'][d]:.4f} | {e['delta_raw'][d]:+.4f} |" if d in e["delta_raw"] else " n/a | n/a |")
        lines.append(row)
    for key in ("quality", "semantic", "total"):
        b = report["arms"][base]["scores"][key]
        row = f"| **{key}** (normalised) | {'n/a' if b is None else f'{b:.4f}'} |"
        for a in others:
            v, dv = report["arms"][a]["scores"][key], report["arms"][a]["delta_scores"][key]
            row += " n/a | n/a |" if v is None else f" {v:.4f} | {dv:+.4f} |"
        lines.append(row)
    lines.append("")
    lines.append(report["arms"][base]["scores"]["label"] + "; deltas are accelerated minus dense on the same "
                 "prompts and seeds.")
    return "\n".join(lines)
