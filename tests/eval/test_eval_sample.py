"""``eval sample`` (resumable, VBench naming, lossless frames, manifest) and ``eval fidelity`` on the tiny
offline CogVideoX pipeline. Random weights: these check plumbing and bookkeeping, never quality."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffusers_attn.cli import main
from diffusers_attn.eval import psnr
from diffusers_attn.eval.fidelity import fidelity
from diffusers_attn.eval.prompts import load_suite, video_name
from diffusers_attn.eval.sample import SampleConfig, sample

CALL = dict(num_inference_steps=2, num_frames=9, height=64, width=64)
KNOBS = {"sparsity": 0.75, "arm_threshold": 0.0, "dense_steps": 0.0}


def _cfg(out, **kw):
    return SampleConfig(model="tiny-cogvideox", out=out, suite="quick", limit=1, videos_per_prompt=2, knobs=KNOBS,
                        call=CALL, device="cpu", warmup=False, **kw)


def _snapshot(root):
    return {p.relative_to(root): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_prompt_suites(tmp_path):
    allp = load_suite("all")
    assert len(allp) == 946 and len({p.text for p in allp}) == 944  # two prompts appear twice in VBench's file
    quick = load_suite("quick")
    assert len(quick) == 44 and quick[0].text == allp[0].text
    assert len(load_suite("dimension:subject_consistency")) == 72
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n a dog \na cat\n")
    assert [p.text for p in load_suite(f"file:{f}")] == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="unknown prompt suite 'nope'; use all | quick"):
        load_suite("nope")
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        load_suite("dimension:beauty")
    assert video_name("a cat", 3) == "a cat-3"
    with pytest.raises(ValueError, match="path separator"):
        video_name("AC/DC", 0)


def test_sample_writes_vbench_layout_and_resumes_without_overwriting(tmp_path):
    root = tmp_path / "run"
    first = load_suite("quick")[0].text
    res = sample(_cfg(root), log=lambda s: None)
    assert res.generated == 4 and res.skipped == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["model"] == "tiny-cogvideox" and manifest["method"] == "rainfusion"
    assert manifest["method_config"]["sparsity"] == 0.75 and manifest["dense_warmup"]["dense_steps"] == 0.0
    assert manifest["base_seed"] == 0 and manifest["call_kwargs"]["num_inference_steps"] == 2
    for arm in ("dense", "rainfusion"):
        for i in range(2):
            name = f"{first}-{i}"
            assert (root / arm / "videos" / f"{name}.mp4").stat().st_size > 0
            frames = np.load(root / arm / "frames" / f"{name}.npz")["frames"]
            assert frames.dtype == np.uint8 and frames.shape == (9, 64, 64, 3)
            rec = json.loads((root / arm / "records" / f"{name}.json").read_text())
            assert rec["seed"] == i and rec["total_s"] > 0 and rec["denoise_s"] > 0
    acc = json.loads((root / "rainfusion" / "records" / f"{first}-0.json").read_text())
    assert acc["density"] < 1  # the sparse path ran
    # seeds differ between videos of one prompt; dense and accelerated share each seed
    d0 = np.load(root / "dense" / "frames" / f"{first}-0.npz")["frames"]
    d1 = np.load(root / "dense" / "frames" / f"{first}-1.npz")["frames"]
    assert not np.array_equal(d0, d1)

    before = _snapshot(root)
    # a finished run never even loads the model
    res = sample(_cfg(root), loader=lambda *a: pytest.fail("loaded a model for a finished run"), log=lambda s: None)
    assert res.generated == 0 and res.skipped == 2
    assert _snapshot(root) == before
    # ... and other settings on a finished folder are refused (not "already finished"), still without loading
    for change, what in (({"knobs": {**KNOBS, "sparsity": 0.5}}, "knobs"), ({"seed": 7}, "base_seed"),
                         ({"call": {**CALL, "num_inference_steps": 3}}, "call_kwargs"),
                         ({"knobs": {**KNOBS, "mode": "rf2"}}, "knobs")):
        with pytest.raises(ValueError, match=f"sampled with other settings \\({what}: "):
            sample(SampleConfig(**{**_cfg(root).__dict__, **change}),
                   loader=lambda *a: pytest.fail("loaded a model for a finished run"), log=lambda s: None)
    assert _snapshot(root) == before

    # a crash after the frames and mp4 of one video but before its record: only that record is redone,
    # and its existing files are kept as they are
    lost = root / "rainfusion" / "records" / f"{first}-1.json"
    lost.unlink()
    res = sample(_cfg(root), log=lambda s: None)
    assert res.generated == 1 and lost.exists()
    after = _snapshot(root)
    for rel, stamp in before.items():
        if rel != lost.relative_to(root):
            assert after[rel] == stamp, f"{rel} was rewritten"
    assert not list(root.rglob(".tmp-*"))

    # growing the run is allowed; changing what was sampled is refused
    res = sample(SampleConfig(**{**_cfg(root).__dict__, "videos_per_prompt": 3}), log=lambda s: None)
    assert res.generated == 2 and res.skipped == 2
    with pytest.raises(ValueError, match="other settings \\(knobs: .*method_config: "):
        sample(SampleConfig(**{**_cfg(root).__dict__, "knobs": {**KNOBS, "sparsity": 0.5}, "videos_per_prompt": 4}),
               log=lambda s: None)


def test_crash_mid_run_loses_only_the_video_in_progress(tmp_path, monkeypatch):
    import diffusers_attn.compare as compare

    root = tmp_path / "run"
    real = compare.generate
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the dense run of the second video
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(compare, "generate", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sample(_cfg(root), log=lambda s: None)
    done = sorted(p.name for p in root.rglob("records/*.json"))
    assert len(done) == 2  # both arms of video 0
    before = _snapshot(root)
    monkeypatch.setattr(compare, "generate", real)
    res = sample(_cfg(root), log=lambda s: None)
    assert res.generated == 2
    after = _snapshot(root)
    assert all(after[k] == v for k, v in before.items() if k.name != "manifest.json")


def test_fidelity_csv_and_summary_match_direct_metrics(tmp_path):
    root = tmp_path / "run"
    sample(_cfg(root), log=lambda s: None)
    summary = fidelity(root, use_lpips=False, log=lambda s: None)
    rows = list(csv.DictReader(open(root / "fidelity.csv")))
    assert len(rows) == 2 and summary["videos"] == 2
    r = rows[0]
    a = np.load(root / "dense" / "frames" / f"{r['name']}.npz")["frames"] / 255.0
    b = np.load(root / "rainfusion" / "frames" / f"{r['name']}.npz")["frames"] / 255.0
    assert float(r["psnr_db"]) == pytest.approx(psnr(a, b))
    vals = [float(x["psnr_db"]) for x in rows]
    assert summary["psnr_db"]["mean"] == pytest.approx(np.mean(vals))
    assert summary["psnr_db"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert summary["density"]["mean"] < 1 and summary["speedup_overall"] > 0
    assert summary["lpips_status"].startswith("disabled") and r["lpips"] == ""
    saved = json.loads((root / "fidelity_summary.json").read_text())
    assert saved["definitions"]["psnr_db"].startswith("PSNR, one MSE")


def test_cli_sample_and_fidelity(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["eval", "sample", "--model", "tiny-cogvideox", "--suite", "quick", "--limit", "1", "--out", str(out),
            "--steps", "2", "--frames", "9", "--height", "64", "--width", "64", "--device", "cpu", "--no-warmup",
            "--knob", "arm_threshold=0", "--knob", "dense_steps=0.0"]
    assert main(args) == 0
    assert main(args) == 0
    assert "generated 0 videos, 1 prompt/index pairs already finished" in capsys.readouterr().out
    assert main(["eval", "fidelity", str(out), "--lpips-backbone", str(tmp_path / "none.pth")]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and text.count("LPIPS skipped, weights not present locally") == 1
    assert "LPIPS LPIPS" not in text
    assert main(["eval", "sample", "--out", str(tmp_path / "x"), "--knob", "sparsity=3"]) == 2
    assert "Sparsity must be in" in capsys.readouterr().err
    # argument errors: one line, before anything loads
    for bad, msg in ((["--frames", "0"], "--frames must be >= 1"), (["--mode", "rf2", "--knob", "mode=rf1"], "disagree"),
                     (["--knob", "sparcity=0.5"], "unknown setting"), (["--model", "/no/such/dir"], "does not exist")):
        assert main(["eval", "sample", "--out", str(tmp_path / "y"), *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "y").exists()


def test_reference_suite_is_the_reference_models_caption_grammar():
    """The default suite for ref-* models: captions they were trained on (VBench prompts are unknown words)."""
    from diffusers_attn.eval.cli import add_eval_parser  # noqa: F401  (the CLI resolves the default suite)
    from diffusers_attn.eval.prompts import REFERENCE_SUITE_SIZE, load_suite
    from diffusers_attn.reference_models.data import caption_vocabulary

    suite = [p.text for p in load_suite("reference")]
    assert len(suite) == len(set(suite)) == REFERENCE_SUITE_SIZE
    assert set(suite) <= set(caption_vocabulary())
    with pytest.raises(ValueError, match="reference"):
        load_suite("nope")
