"""The command line as a new user meets it: fast help, one-line errors (exit 2) before any model loads, outputs
that survive a failed run, repeated timings, progress on stderr, and ``--mode`` with per-pattern density."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusers_attn import cli
from diffusers_attn._defaults import DEFAULT_SPARSITY, VAR_BUILTIN_MODELS, VIDEO_BUILTIN_MODELS
from diffusers_attn.cli_checks import replace_on_success

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "numpy")


def _run(*args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "diffusers_attn", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ help


def test_help_imports_no_torch_and_shows_the_library_default():
    code = (
        "import sys\n"
        "from diffusers_attn.cli import main\n"
        "for argv in (['--help'], ['compare', '--help'], ['eval', '--help'], ['eval', 'sample', '--help'],"
        " ['plan', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "from diffusers_attn.generate import main as generate_main\n"
        "try:\n"
        "    generate_main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = _run(code=code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    from diffusers_attn import RainFusionConfig

    assert RainFusionConfig().sparsity == DEFAULT_SPARSITY  # one default, shared
    compare_help = cli.build_parser()._subparsers._group_actions[0].choices["compare"].format_help()
    assert f"default: {DEFAULT_SPARSITY}" in " ".join(compare_help.split())
    assert "--mode {rf1,rf2}" in compare_help and "--repeats" in compare_help


def test_eval_help_is_plain_text_and_sample_has_a_description(capsys):
    for argv in (["eval", "--help"], ["eval", "sample", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    out = capsys.readouterr().out
    assert "``" not in out
    assert "Generate every prompt of a suite twice with the same seed" in " ".join(out.split())


def test_builtin_model_names_match_their_builders():
    from diffusers_attn.pipelines.tiny import TINY_MODELS, TINY_VAR_MODELS
    from diffusers_attn.reference_models import REFERENCE_MODELS
    from diffusers_attn.reference_models.var import REFERENCE_VAR_MODELS

    assert set(VIDEO_BUILTIN_MODELS) == {*REFERENCE_MODELS, *TINY_MODELS}
    assert set(VAR_BUILTIN_MODELS) == {*REFERENCE_VAR_MODELS, *TINY_VAR_MODELS}


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "0"], "--frames must be >= 1, got 0"),
        (["--steps", "-3"], "--steps must be >= 1, got -3"),
        (["--sparsity", "1"], "--sparsity must be in [0, 1), got 1.0"),
        (["--height", "30"], "--height must be a multiple of 16"),
        (["--repeats", "0"], "--repeats must be in [1, 100]"),
        (["--frames", "x"], "argument --frames: invalid int value: 'x'"),
        (["--mode", "rf3"], "invalid choice: 'rf3'"),
        (["--model", "/nonexistent/path"], "--model /nonexistent/path: the path does not exist"),
        (["--model", "bad name"], "is neither a built-in model"),
        (["--model", "tiny-var"], "class-conditional VAR model"),
        (["--model", "no-such-org/x"], "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
        (["--json", "report.txt"], "--json report.txt: the file name must end in one of .json"),
    ],
)
def test_bad_compare_argument_is_one_line_exit_2_and_keeps_the_old_output(tmp_path, args, message):
    out = tmp_path / "compare.mp4"
    out.write_bytes(b"an earlier result")
    proc = _run("compare", *args, "--out", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert out.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.mp4"]  # no temporary file left


def test_device_cuda_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _run("compare", "--device", "cuda", "--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--device cuda:" in proc.stderr and "without CUDA" in proc.stderr


def test_out_must_be_a_video_file_name(tmp_path):
    proc = _run("compare", "--out", str(tmp_path))
    assert proc.returncode == 2 and "is a folder" in proc.stderr
    proc = _run("compare", "--out", str(tmp_path / "x.txt"))
    assert proc.returncode == 2 and "must end in one of .mp4" in proc.stderr


def test_generate_checks_arguments_first(tmp_path, capsys):
    from diffusers_attn.generate import main

    assert main(["--frames", "0", "--out", str(tmp_path / "g.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--frames must be >= 1" in err
    assert not (tmp_path / "g.mp4").exists()


# ------------------------------------------------------------------------------------------------ helpers


def test_replace_on_success_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), replace_on_success(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4" and tmp != path
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    with replace_on_success(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]


def test_logging_has_one_handler_and_leaves_the_root_alone():
    root_handlers = list(logging.getLogger().handlers)
    cli.setup_logging(False)
    cli.setup_logging(True)
    log = logging.getLogger("diffusers_attn")
    assert sum(getattr(h, "_diffusers_attn_cli", False) for h in log.handlers) == 1
    assert log.level == logging.INFO and log.propagate is False
    assert logging.getLogger().handlers == root_handlers
    log.propagate = True  # as pytest's log capture expects
    log.handlers = [h for h in log.handlers if not getattr(h, "_diffusers_attn_cli", False)]
    log.setLevel(logging.NOTSET)


def test_per_frame_psnr_mean_ignores_identical_frames():
    from diffusers_attn.eval.metrics import finite_mean, psnr_frames

    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 16, 3))
    b = a.copy()
    b[1] += 0.01
    b[2] += 0.02
    vals = psnr_frames(a, b)
    assert np.isinf(vals[0]) and np.isfinite(vals[1:]).all()
    mean, identical = finite_mean(vals)
    assert identical == 1 and mean == pytest.approx((40.0 + 20 * np.log10(50)) / 2, rel=1e-6)
    assert finite_mean(psnr_frames(a, a)) == (None, 3)


def _result(dense_times, accel_times, video_density=0.3, small=False):
    from diffusers_attn.compare import ComparisonResult, RunResult, _median_run, speedup_withheld
    from diffusers_attn.stats import AttentionStats

    frames = np.zeros((1, 2, 2, 3), np.float32)
    stats = AttentionStats(method="rainfusion", calls=4, skipped_calls=0, steps=2, density=video_density,
                           video_density=video_density, pattern_histogram={}, dense_fallbacks={},
                           dense_fallback_rate=0.0, timings_ms={})
    runs = lambda ts: _median_run([RunResult(frames, t, t) for t in ts])  # noqa: E731
    return ComparisonResult(runs(dense_times), runs(accel_times), 40.0, 40.0, 1.0, stats, {},
                            speedup_withheld=speedup_withheld(stats, small))


def test_speedup_is_a_median_with_its_spread_or_withheld():
    r = _result([2.0, 4.0, 2.2], [1.0, 1.1, 0.9])
    assert r.speedup == pytest.approx(2.2 / 1.0) and r.speedup_range == pytest.approx((2.0 / 1.1, 4.0 / 0.9))
    assert "2.20x total (median of 3 runs each; 1.82-4.44x over run pairs)" in r.speedup_text()
    dense = _result([2.0], [1.0], video_density=1.0)
    assert dense.speedup_text().startswith("not reported: nothing ran sparse")
    small = _result([2.0], [1.0], small=True)
    assert "too small for timings" in small.speedup_text()
    assert json.loads(json.dumps(small.to_dict()))["speedup_withheld"] == small.speedup_withheld


def test_pattern_video_density_is_split_by_pattern():
    from diffusers_attn.stats import StatsRecorder

    rec = StatsRecorder()
    heads = np.array([[1, 2]])
    rec.record(0, head_patterns=heads, computed=3.0, total=8.0, video_computed=3.0, video_total=8.0,
               pattern_video_pairs={"spatial": (1.0, 4.0), "temporal": (2.0, 4.0)})
    rec.record(1, head_patterns=np.array([[0, 0]]), computed=8.0, total=8.0, video_computed=8.0, video_total=8.0,
               fallback_reason="dense warm-up step")
    rec.record(2, head_patterns=np.array([[1, 1]]), computed=2.0, total=8.0, video_computed=2.0, video_total=8.0)
    s = rec.summary()
    assert s.pattern_video_density == pytest.approx({"spatial": 3.0 / 12.0, "temporal": 0.5, "fallback": 1.0})
    assert "executed video x video density per pattern: spatial 0.250, temporal 0.500" in str(s)


# ------------------------------------------------------------------------------------------------ a real run


def test_compare_rf2_on_the_tiny_model_reports_progress_density_and_no_speedup(tmp_path, capsys):
    out, js = tmp_path / "c.mp4", tmp_path / "c.json"
    argv = ["compare", "--model", "tiny-cogvideox", "--steps", "2", "--frames", "9", "--height", "64", "--width",
            "64", "--mode", "rf2", "--sparsity", "0.75", "--dense-steps", "0", "--dense-layers", "0", "--no-warmup",
            "--device", "cpu", "--out", str(out), "--json", str(js)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    for phase in ("loading tiny-cogvideox", "dense run", "rainfusion run", "metrics"):
        assert f"diffusers-attn: {phase}" in captured.err
    assert "RainFusion rf2, sparsity 0.75" in captured.out
    assert "speedup:      not reported: the built-in tiny/reference models are too small" in captured.out
    report = json.loads(js.read_text())
    assert report["settings"]["rainfusion_mode"] == "rf2" and report["dense"]["total_times"]
    per = report["stats"]["pattern_video_density"]
    assert set(per) == {"rf2"} and per["rf2"] == pytest.approx(report["stats"]["video_density"]) and per["rf2"] < 1
    # rf2 meets the budget 1 - sparsity, or says before the numbers that its forced regions alone exceed it
    assert per["rf2"] <= 0.25 + 1e-9 or "rf2_budget_unmet" in report["stats"]["info"]
    assert out.stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.mp4"]


def test_compare_rf1_reports_each_patterns_executed_density(tmp_path, capsys):
    js = tmp_path / "c.json"
    argv = ["compare", "--model", "tiny-cogvideox", "--steps", "2", "--frames", "9", "--height", "64", "--width",
            "64", "--sparsity", "0.75", "--arm-threshold", "0", "--dense-steps", "0", "--dense-layers", "0",
            "--no-warmup", "--device", "cpu", "--out", str(tmp_path / "c.mp4"), "--json", str(js)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    stats = json.loads(js.read_text())["stats"]
    per = stats["pattern_video_density"]
    sparse = set(per) & {"spatial", "temporal", "textural"}
    assert sparse and set(per) <= {"spatial", "temporal", "textural", "dense", "fallback"}
    assert all(0 < per[p] < 1 for p in sparse) and per.get("dense", 1.0) == 1.0
    assert min(per[p] for p in sparse) <= stats["video_density"] <= max(per.values())
    assert "executed video density per pattern: " in out
