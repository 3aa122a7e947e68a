"""The side-by-side demo: input validation, the pattern plot, the method registry, and a loopback launch with a
``gradio_client`` round trip on the tiny CogVideoX pipeline."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from diffusers_attn.demo import (
    METHODS,
    DemoInputError,
    DemoMethod,
    DemoRequest,
    DemoRunner,
    Knob,
    pattern_plot,
    register_method,
)
from diffusers_attn.stats import AttentionStats, LayerStats

SMALL = dict(model="tiny-cogvideox", steps=3, frames=9, height=64, width=64, warmup=False)
# every head past warm-up sparse with its best pattern (argmax; the cheapest rule at 0 takes the cheapest pattern)
RF_ZERO_ARM = {"sparsity": 0.75, "dense_steps": 0.25, "dense_layers": 1, "arm_threshold": 0.0, "arm_rule": "argmax"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runner():
    return DemoRunner(device="cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"steps": 0}, r"Steps must be in \[1, 50\]"),
        ({"steps": 2.5}, "whole number"),
        ({"height": 72}, "multiple of 16"),
        ({"width": 4096}, r"Width must be in"),
        ({"method": "nope"}, "unknown method 'nope'; available: rainfusion, litevar, feat"),
        ({"knobs": {"sparsity": 1.5}}, r"Sparsity must be in \[0.0, 0.95\]"),
        ({"knobs": {"sparsity": float("nan")}}, "finite"),
        ({"model": ""}, "choose a model"),
    ],
)
def test_bad_input_is_rejected_before_loading(change, message):
    loads = []
    runner = DemoRunner(device="cpu", loader=lambda *a: loads.append(a))
    with pytest.raises(DemoInputError, match=message):
        runner.run(DemoRequest(**{"prompt": "a fox", **SMALL, **change}))
    assert not loads  # nothing heavy ran


def test_unknown_model_id_is_a_readable_error(runner, tmp_path):
    with pytest.raises(DemoInputError, match="the path does not exist. Built-in offline models: ref-cogvideox.*tiny-cogvideox"):
        runner.run(DemoRequest(**{**SMALL, "model": str(tmp_path / "missing")}, prompt="a fox"))
    (tmp_path / "empty").mkdir()  # a folder that is not a pipeline: diffusers' error, in one line
    with pytest.raises(DemoInputError, match="^cannot load model .*Built-in offline models: ref-cogvideox") as e:
        runner.run(DemoRequest(**{**SMALL, "model": str(tmp_path / "empty")}, prompt="a fox"))
    assert "\n" not in str(e.value)


def test_bad_embeddings_file(runner, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"not_a_kwarg": torch.zeros(1)}, bad)
    with pytest.raises(DemoInputError, match="keys this pipeline does not take: \\['not_a_kwarg'\\]"):
        runner.run(DemoRequest(prompt="", embeddings_path=str(bad), **SMALL))


def test_run_with_embeddings_file_matches_prompt(runner, tmp_path):
    """An embeddings file holding the tiny model's own pseudo-embeddings gives the same dense output."""
    from diffusers_attn.pipelines.tiny import prompt_embeddings

    emb, _ = prompt_embeddings("a red fox", 16, 32)
    neg, _ = prompt_embeddings("", 16, 32)
    path = tmp_path / "emb.pt"
    torch.save({"prompt_embeds": emb, "negative_prompt_embeds": neg}, path)
    a = runner.run(DemoRequest(prompt="a red fox", knobs=RF_ZERO_ARM, **SMALL))
    b = runner.run(DemoRequest(prompt="", embeddings_path=str(path), knobs=RF_ZERO_ARM, **SMALL))
    assert a.metrics["settings"]["seed"] == b.metrics["settings"]["seed"] == 0
    import imageio.v3 as iio

    assert np.array_equal(iio.imread(a.dense_video), iio.imread(b.dense_video))


def test_run_reports_everything(runner):
    seen = []
    res = runner.run(DemoRequest(prompt="a fox", knobs=RF_ZERO_ARM, **SMALL), progress=lambda f, d: seen.append((f, d)))
    m = res.metrics
    for key in ("dense_denoise_s", "dense_total_s", "accelerated_denoise_s", "accelerated_total_s"):
        assert m[key] > 0
    assert m["speedup_total"] == pytest.approx(m["dense_total_s"] / m["accelerated_total_s"])
    assert 0 < m["density"] < 1 and m["pattern_histogram"]["spatial"] + m["pattern_histogram"]["temporal"] > 0
    assert m["ssim"] <= 1
    assert "denoising latency" in res.dense_caption and "total latency" in res.accel_caption
    assert res.dense_video.endswith(".mp4") and res.accel_video.endswith(".mp4")
    assert res.pattern_plot is not None and res.pattern_plot.ndim == 3
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] > 0.9
    assert any("dense: step 3/3" in d for _, d in seen) and any("rainfusion: step 3/3" in d for _, d in seen)


def test_pattern_plot_colors_each_head():
    layer = LayerStats(layer=0, calls=4, density=0.5, video_density=0.5,
                       head_patterns=[{"spatial": 4}, {"temporal": 2, "fallback": 2}], dominant_patterns=[],
                       mean_recall=None)
    stats = AttentionStats(method="x", calls=4, skipped_calls=0, steps=4, density=0.5, video_density=0.5,
                           pattern_histogram={}, dense_fallbacks={}, dense_fallback_rate=0.0, timings_ms={},
                           layers=[layer])
    img = pattern_plot(stats, cell_w=30, cell_h=18)
    img = img[::2, ::2]  # drawn at 2x
    row = img[40 + 8]  # middle of the first layer row
    h0 = row[70:70 + 28]
    assert (h0 == (66, 133, 244)).all(axis=-1).all()  # head 0: all spatial
    h1 = row[100:100 + 28]
    assert (h1[:13] == (244, 160, 0)).all() and (h1[-13:] == (70, 70, 70)).all()  # half temporal, half dense
    stats.layers = []
    assert pattern_plot(stats) is None


def test_registry_entry_adds_a_method_with_class_labels():
    calls = []
    meth = DemoMethod(key="fake-var", label="Fake VAR", conditioning="class_labels",
                      knobs=(Knob("k", "K", "int", 2, 1, 4),), make_apply=lambda kn, lo: calls.append(kn))
    register_method(meth)
    try:
        runner = DemoRunner(device="cpu", loader=lambda *a: pytest.fail("must not load on bad input"))
        with pytest.raises(DemoInputError, match="class labels must be non-negative integers, got 'cat'"):
            runner.run(DemoRequest(method="fake-var", prompt="207, cat", **SMALL))
        with pytest.raises(DemoInputError, match="K must be in"):
            runner.run(DemoRequest(method="fake-var", prompt="207", knobs={"k": 9}, **SMALL))
        from diffusers_attn.demo.app import knob_order

        assert ("fake-var", "k") in knob_order()
    finally:
        METHODS.pop("fake-var")
    with pytest.raises(ValueError, match="conditioning"):
        register_method(DemoMethod(key="x", label="x", knobs=(), make_apply=None, conditioning="audio"))


@pytest.fixture(scope="module")
def served(runner):
    """The page launched on loopback once for this module, with a ``gradio_client`` connected to it."""
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    from diffusers_attn.demo import build_demo

    port = free_port()
    demo = build_demo(runner)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.server_name == "127.0.0.1"
        yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def api_knobs(method: str, **values) -> list:
    """Every registered knob in API order: ``values`` for ``method``'s, defaults for the others."""
    from diffusers_attn.demo.app import knob_order

    out = []
    for mk, name in knob_order():
        default = next(k.default for k in METHODS[mk].knobs if k.name == name)
        out.append(values.get(name, default) if mk == method else default)
    return out


def test_loopback_launch_and_gradio_client_round_trip(served):
    client = served
    fixed = ["tiny-cogvideox", "rainfusion", "a fox", "", None, 0, False, 3, 9, 64, 64, False]
    knobs = api_knobs("rainfusion", arm_threshold=0.0)
    out = client.predict(*fixed, *knobs, api_name="/compare")
    dense_v, accel_v, _, _, dense_cap, accel_cap, summary, plot, metrics, seed_used = out
    assert dense_v["value"].endswith("dense.mp4") and accel_v["value"].endswith("rainfusion.mp4")
    assert "denoising latency" in dense_cap and "RainFusion" in accel_cap
    assert "Speedup" in summary and "PSNR" in summary and "Realized density" in summary
    assert metrics["density"] < 1 and seed_used == 0
    # bad input: a readable message, and the app keeps serving
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("tiny-cogvideox", "rainfusion", "", *fixed[3:], *knobs, api_name="/compare")
    with pytest.raises(Exception, match="greater than maximum value 0.95"):  # Gradio checks the slider range
        client.predict(*fixed, 2.0, *knobs[1:], api_name="/compare")
    again = client.predict(*fixed, *knobs, api_name="/compare")
    assert again[8]["psnr_db"] == metrics["psnr_db"]  # same seed, same result


def test_gradio_client_round_trip_var_images(served):
    """LiteVAR on tiny-var through the page's API: class labels in, two images (no videos) and per-scale figures
    out; a class label beyond the model's classes is a readable error."""
    client = served
    fixed = ["tiny-var", "litevar", "207, 360", "", None, 0, False, 8, 9, 64, 64, False]
    out = client.predict(*fixed, *api_knobs("litevar"), api_name="/compare")
    dense_v, accel_v, dense_i, accel_i, dense_cap, accel_cap, summary, plot, metrics, seed_used = out
    assert not dense_v["visible"] and dense_v.get("value") is None  # images, not videos
    assert not accel_v["visible"] and accel_v.get("value") is None
    from PIL import Image

    assert dense_i["visible"] and accel_i["visible"]
    dense_path, accel_path = dense_i["value"], accel_i["value"]
    assert dense_path.endswith("dense.png") and accel_path.endswith("litevar.png")
    assert Image.open(dense_path).size == Image.open(accel_path).size == (2 * 64 + 4, 64)  # two labels in a row
    assert "sampling latency" in dense_cap and "LiteVAR" in accel_cap
    assert "Kept attention share" in summary and "SSIM" in summary
    assert 0 < metrics["density"] < 1 and metrics["ssim"] <= 1 and seed_used == 0
    assert set(metrics["kept_share_per_scale"]) == {"0", "1", "2", "3", "4", "5"}
    assert metrics["method_report"]["calibration"]["calibration_labels"]
    with pytest.raises(Exception, match=r"class label '1000' is not an integer in \[0, 999\]"):
        client.predict("tiny-var", "litevar", "207, 1000", *fixed[3:], *api_knobs("litevar"), api_name="/compare")


def test_cli_demo_binds_loopback_by_default(monkeypatch, capsys):
    pytest.importorskip("gradio")
    from diffusers_attn import cli
    from diffusers_attn.demo import app

    seen = {}

    class FakeDemo:
        local_url, share_url = "http://127.0.0.1:7999/", None

        def block_thread(self):
            seen["blocked"] = True

    def fake_launch(**kw):
        seen.update(kw)
        return FakeDemo()

    monkeypatch.setattr(app, "launch_demo", fake_launch)
    import diffusers_attn.demo as demo_pkg

    monkeypatch.setattr(demo_pkg, "launch_demo", fake_launch)
    assert cli.main(["demo", "--port", "7999", "--device", "cpu"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 7999 and seen["share"] is False and seen["blocked"]
    # Gradio's own hint names launch(share=True); a CLI user is told the flag instead
    assert seen["quiet"] is True and "run again with --share" in capsys.readouterr().out
    assert cli.main(["demo", "--host", "0.0.0.0", "--share", "--device", "cpu"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["share"] is True
    assert cli.main(["demo", "--port", "0"]) == 2
    assert cli.main(["demo", "--device", "cuda:9"]) == 2


def test_demo_page_has_gradio_analytics_off():
    pytest.importorskip("gradio")
    import os

    from diffusers_attn.demo.app import build_demo

    page = build_demo(DemoRunner(device="cpu"))
    assert page.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_run_folders_are_pruned_and_ref_var_is_not_called_random(tmp_path):
    from diffusers_attn.demo import runner as runner_mod

    r = DemoRunner(device="cpu", out_dir=tmp_path)
    made = []
    for _ in range(runner_mod.KEEP_RUNS + 3):
        made.append(r._new_run_dir())
        made[-1].mkdir()  # as a run leaves it
    assert sorted(tmp_path.iterdir()) == sorted(made[-runner_mod.KEEP_RUNS:])  # the newest runs are kept
    from diffusers_attn.compare import LoadedPipeline

    note = runner_mod._note("ref-var", LoadedPipeline(None, "ref-var", dict, tiny=True))
    assert "random" not in note and "trained" in note


def test_local_pipeline_folder_runs_through_the_real_loading_code(tmp_path):
    """A diffusers folder (saved tiny CogVideoX with a real tokenizer and T5 encoder) loads via from_pretrained."""
    from diffusers_attn.pipelines.tiny import build_tiny_cogvideox

    folder = tmp_path / "saved"
    build_tiny_cogvideox(text_encoder=True).pipe.save_pretrained(folder)
    res = DemoRunner(device="cpu").run(DemoRequest(**{**SMALL, "model": str(folder)},
                                                   prompt="a red fox runs through snow", knobs=RF_ZERO_ARM))
    assert res.metrics["settings"]["model"] == str(folder) and res.metrics["dense_total_s"] > 0
    # not a tiny built-in: real-model defaults (4096-token floor) keep this small input dense, and say so
    assert res.metrics["dense_fallbacks"]


def test_out_of_memory_is_a_readable_message_and_unloads(runner):
    def boom(knobs, loaded):
        def apply(pipe):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return apply

    register_method(DemoMethod(key="oom", label="OOM", knobs=(), make_apply=boom))
    try:
        with pytest.raises(DemoInputError, match="out of memory: try fewer frames"):
            runner.run(DemoRequest(method="oom", prompt="a fox", **SMALL))
        assert runner._cached is None
        with pytest.raises(DemoInputError, match="the run failed: ZeroDivisionError"):
            register_method(DemoMethod(key="oom", label="OOM", knobs=(),
                                       make_apply=lambda k, lo: (lambda pipe: 1 / 0)))
            runner.run(DemoRequest(method="oom", prompt="a fox", **SMALL))
    finally:
        METHODS.pop("oom")
    assert runner.run(DemoRequest(prompt="a fox", **SMALL)).metrics["dense_total_s"] > 0  # still serving


def test_default_request_runs_the_trained_reference_model(runner):
    """The page's defaults (no model chosen) run ref-cogvideox on its own caption grammar, with real sparsity."""
    from diffusers_attn.demo.app import DEFAULT_PROMPT

    req = DemoRequest(prompt=DEFAULT_PROMPT, knobs=RF_ZERO_ARM, warmup=False)
    assert req.model == "ref-cogvideox"
    res = runner.run(req)
    assert res.metrics["settings"]["model"] == "ref-cogvideox"
    assert res.metrics["density"] < 1
    # measured here (CPU fp32, 2026-12-02): 37.2 dB, SSIM 0.994, density 0.89 with every head sparse at 0.75
    assert res.metrics["psnr_db"] > 30 and res.metrics["ssim"] > 0.95
    assert "reference model trained" in res.summary_md and "random-weight" not in res.summary_md
