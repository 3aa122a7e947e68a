"""VBench runner (against a fake ``vbench`` executable that writes VBench-format result files), weights doctor on
fake cache trees, and the partial-set aggregator against hand-computed fixtures. No network, no VBench."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from diffusers_attn.cli import main
from diffusers_attn.eval import vbench as vb

FAKE = textwrap.dedent("""\
    #!{python}
    # Fake `vbench evaluate`: records its arguments and writes {{name}}_eval_results.json like VBench 0.1.5
    # (dimension -> [score, per-video results]). Scores: dense 0.90, accelerated 0.88 (0.5 / 0.45 for dynamic_degree).
    import argparse, json, os, pathlib, sys
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("--videos_path"); p.add_argument("--dimension"); p.add_argument("--mode")
    p.add_argument("--output_path"); p.add_argument("--load_ckpt_from_local")
    a = p.parse_args()
    log = pathlib.Path(os.environ["FAKE_VBENCH_LOG"])
    with log.open("a") as f:
        f.write(json.dumps({{"argv": sys.argv[1:], "cache": os.environ.get("VBENCH_CACHE_DIR"),
                            "path0": os.environ["PATH"].split(os.pathsep)[0]}}) + "\\n")
    dense = "/dense/" in a.videos_path
    score = (0.5 if dense else 0.45) if a.dimension == "dynamic_degree" else (0.90 if dense else 0.88)
    vids = sorted(os.listdir(a.videos_path))
    per_video = [{{"video_path": os.path.join(a.videos_path, v), "video_results": score}} for v in vids]
    out = {{a.dimension: [score, per_video]}}
    pathlib.Path(a.output_path, "results_2026-12-02-00:00:00_eval_results.json").write_text(json.dumps(out))
    print("Evaluation results saved")
""")


@pytest.fixture
def fake_vbench(tmp_path, monkeypatch):
    venv = tmp_path / "vbench-venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "vbench"
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_VBENCH_LOG", str(log))
    return venv, log


@pytest.fixture
def samples(tmp_path):
    root = tmp_path / "run"
    for arm in ("dense", "rainfusion"):
        (root / arm / "videos").mkdir(parents=True)
        for i in range(2):
            (root / arm / "videos" / f"a cat-{i}.mp4").write_bytes(b"\0")
    (root / "manifest.json").write_text(json.dumps({"arms": ["dense", "rainfusion"]}))
    return root


def test_runner_calls_vbench_per_arm_and_dimension_and_resumes(fake_vbench, samples, tmp_path):
    venv, log = fake_vbench
    cache = tmp_path / "weights"
    cache.mkdir()
    out = vb.run_vbench(samples, ["subject_consistency", "dynamic_degree"], mode="custom", venv=venv,
                        cache_dir=cache, log=lambda s: None)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 4
    argv = calls[0]["argv"]
    assert argv[0] == "evaluate" and argv[argv.index("--mode") + 1] == "custom_input"
    assert argv[argv.index("--dimension") + 1] == "subject_consistency"
    assert argv[argv.index("--videos_path") + 1] == str((samples / "dense" / "videos").resolve())
    assert argv[-2:] == ["--load_ckpt_from_local", "True"]
    assert calls[0]["cache"] == str(cache.resolve()) and calls[0]["path0"] == str(venv / "bin")
    assert vb.result_files(out / "rainfusion" / "dynamic_degree")
    # finished dimensions are not rerun
    vb.run_vbench(samples, ["subject_consistency", "dynamic_degree"], mode="custom", venv=venv, log=lambda s: None)
    assert len(log.read_text().splitlines()) == 4

    report = vb.aggregate(out)
    rf = report["arms"]["rainfusion"]
    assert rf["delta_raw"]["subject_consistency"] == pytest.approx(-0.02)
    assert rf["delta_raw"]["dynamic_degree"] == pytest.approx(-0.05)
    # quality over the two dims present: (norm_sc + 0.5 * dd) / 1.5
    q_dense = ((0.90 - 0.1462) / (1 - 0.1462) + 0.5 * 0.5) / 1.5
    assert report["arms"]["dense"]["scores"]["quality"] == pytest.approx(q_dense)
    assert report["arms"]["dense"]["scores"]["label"].startswith("partial (unofficial): renormalised over 2 of 16")
    text = vb.format_aggregate(report)
    assert "| subject_consistency | 0.9000 | 0.8800 | -0.0200 |" in text


def test_standard_mode_on_a_partial_suite_warns(fake_vbench, samples):
    venv, _ = fake_vbench
    (samples / "manifest.json").write_text(json.dumps({"arms": ["dense", "rainfusion"], "suite": "quick",
                                                       "videos_per_prompt": 1}))
    logs = []
    vb.run_vbench(samples, ["temporal_flickering"], venv=venv, log=logs.append)
    assert logs[0].startswith("warning: standard mode expects the full VBench suite with 5 videos per prompt")
    assert any("--mode vbench_standard" in line for line in logs)


def test_custom_mode_rejects_unsupported_dimensions_and_missing_exe(samples, tmp_path):
    with pytest.raises(ValueError, match="custom-input mode supports subject_consistency"):
        vb.run_vbench(samples, ["object_class"], mode="custom", exe=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown VBench dimensions \\['beauty'\\]"):
        vb.run_vbench(samples, ["beauty"], exe=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="vbench-setup --venv DIR"):
        vb.run_vbench(samples, ["temporal_flickering"], exe=tmp_path / "nope")


def test_failing_vbench_is_reported_with_its_log(samples, tmp_path):
    exe = tmp_path / "bad-vbench"
    exe.write_text(f"#!{sys.executable}\nimport sys; print('CUDA out of memory'); sys.exit(3)\n")
    exe.chmod(0o755)
    with pytest.raises(RuntimeError, match="vbench failed on dense/temporal_flickering \\(exit 3\\).*CUDA out of"):
        vb.run_vbench(samples, ["temporal_flickering"], exe=exe, log=lambda s: None)


def test_aggregate_hand_computed_all_dimensions(tmp_path):
    """All 16 present: matches cal_final_score.py's formulas (worked by hand for constant raw scores)."""
    for arm, raw in (("dense", 0.5), ("rf", 0.4)):
        d = tmp_path / arm
        d.mkdir()
        (d / "x_eval_results.json").write_text(json.dumps({dim: [raw, []] for dim in vb.DIMENSIONS}))
    rep = vb.aggregate(tmp_path, baseline="dense")
    s = rep["arms"]["dense"]["scores"]
    norm = {d: (0.5 - lo) / (hi - lo) * vb.WEIGHT[d] for d, (lo, hi) in vb.NORMALIZE.items()}
    q = sum(norm[d] for d in vb.QUALITY) / 6.5
    sem = sum(norm[d] for d in vb.SEMANTIC) / 9
    assert s["quality"] == pytest.approx(q) and s["semantic"] == pytest.approx(sem)
    assert s["total"] == pytest.approx((4 * q + sem) / 5)
    assert s["label"] == "official (all 16 dimensions)"
    # spot value: temporal_flickering normalised (0.5 - 0.6293) / (1 - 0.6293)
    assert rep["arms"]["dense"]["normalized"]["temporal_flickering"] == pytest.approx(-0.348799568)
    assert rep["arms"]["rf"]["delta_raw"]["color"] == pytest.approx(-0.1)


def test_aggregate_renormalises_instead_of_zero_filling(tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "rf").mkdir()
    (tmp_path / "dense" / "a_eval_results.json").write_text(json.dumps({"imaging_quality": [0.6, []],
                                                                       "color": [0.8, []]}))
    (tmp_path / "rf" / "a_eval_results.json").write_text(json.dumps({"imaging_quality": [0.5, []]}))
    rep = vb.aggregate(tmp_path)
    dense = rep["arms"]["dense"]["scores"]
    assert dense["quality"] == pytest.approx(0.6) and dense["semantic"] == pytest.approx(0.8)
    assert dense["total"] == pytest.approx((4 * 0.6 + 0.8) / 5)  # zero-filling would give ~0.1156
    rf = rep["arms"]["rf"]
    assert rf["missing_vs_baseline"] == ["color"]
    assert rf["scores"]["semantic"] is None and rf["scores"]["total"] == pytest.approx(0.5)
    assert rf["delta_scores"]["quality"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="no 'dense' results"):
        vb.aggregate(tmp_path, arms=["rf"])


def test_doctor_on_fake_cache_tree(tmp_path):
    cache = tmp_path / "cache"
    (cache / "clip_model").mkdir(parents=True)
    (cache / "clip_model" / "ViT-B-32.pt").write_bytes(b"x")
    (cache / "dino_model" / "facebookresearch_dino_main").mkdir(parents=True)
    st = {s.dimension: s for s in vb.doctor(cache)}
    assert st["temporal_flickering"].runnable  # needs no weights
    assert st["background_consistency"].runnable and st["appearance_style"].runnable
    assert not st["subject_consistency"].runnable
    assert st["subject_consistency"].missing == ["dino_model/dino_vitbase16_pretrain.pth"]
    assert "detectron2" in " ".join(st["object_class"].missing)
    assert "grit_model/grit_b_densecap_objectdet.pth" in st["color"].missing
    # detectron2 checked with the venv's interpreter (this one: not installed -> missing)
    (cache / "grit_model").mkdir()
    (cache / "grit_model" / "grit_b_densecap_objectdet.pth").write_bytes(b"x")
    st = {s.dimension: s for s in vb.doctor(cache, python=sys.executable)}
    has_d2 = __import__("importlib").util.find_spec("detectron2") is not None
    assert st["color"].runnable == has_d2
    text = vb.format_doctor(list(st.values()), cache)
    assert "ok      temporal_flickering" in text and "MISSING subject_consistency" in text


def test_cli_vbench_commands(fake_vbench, samples, tmp_path, capsys):
    venv, _ = fake_vbench
    assert main(["eval", "vbench", str(samples), "--venv", str(venv), "--dimensions", "imaging_quality"]) == 0
    out = capsys.readouterr().out
    assert "| imaging_quality | 0.9000 | 0.8800 | -0.0200 |" in out and "partial (unofficial)" in out
    assert main(["eval", "vbench-aggregate", str(samples / "vbench"), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["arms"]["rainfusion"]["delta_raw"]["imaging_quality"] < 0
    assert main(["eval", "vbench-doctor", "--cache-dir", str(tmp_path / "empty")]) == 0
    assert "1/16 dimensions can run offline" in capsys.readouterr().out
    assert main(["eval", "vbench-setup", "--venv", str(tmp_path / "v"), "--dry-run"]) == 0
    assert "pip install vbench==0.1.5" in capsys.readouterr().out
    assert not (tmp_path / "v").exists()
    assert main(["eval", "vbench", str(samples), "--venv", str(venv), "--mode", "custom",
                 "--dimensions", "scene"]) == 2
    assert "custom-input mode supports" in capsys.readouterr().err
    assert os.environ.get("FAKE_VBENCH_LOG")
