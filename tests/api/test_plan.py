"""`diffusers-attn plan` and `plan_report`: real-model grids, executed densities against a direct plan, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_attn.cli import main
from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import (
    PATTERN_NAMES,
    RainFusionConfig,
    RainFusionMethod,
    RainFusionPlan,
    pattern_params,
)
from diffusers_attn.model_shapes import MODEL_SHAPES, get_model_shape
from diffusers_attn.plan_report import forced_video_share, plan_report

ROOT = Path(__file__).resolve().parents[2]

GRIDS = [  # (model, frames, height, width) -> post-patch (T, H, W), tokens (video, text)
    ("cogvideox-5b", (49, 480, 720), (13, 30, 45), (17_550, 226)),
    ("cogvideox1.5-5b", (81, 768, 1360), (11, 48, 85), (44_880, 226)),
    ("hunyuanvideo", (129, 720, 1280), (33, 45, 80), (118_800, 256)),
    ("opensora-v2", (129, 768, 768), (33, 48, 48), (76_032, 512)),
    ("wan2.1-14b", (81, 720, 1280), (21, 45, 80), (75_600, 0)),
    ("wan2.1-1.3b", (81, 480, 832), (21, 30, 52), (32_760, 0)),
    ("wan2.2-a14b", (81, 720, 1280), (21, 45, 80), (75_600, 0)),
    ("wan2.2-ti2v-5b", (121, 704, 1280), (31, 22, 40), (27_280, 0)),  # VAE 4x16x16
    ("hunyuanvideo-1.5-480p", (121, 480, 848), (31, 30, 53), (49_290, 1985)),
    ("hunyuanvideo-1.5-720p", (121, 720, 1280), (31, 45, 80), (111_600, 1985)),
]


@pytest.mark.parametrize("model, video, grid, tokens", GRIDS)
def test_grid_formula_per_family(model, video, grid, tokens):
    shape = get_model_shape(model)
    assert shape.latent_grid(*video) == grid
    assert shape.default_video == video
    T, H, W = grid
    assert (T * H * W, shape.text_len) == tokens


def test_cogvideox15_pads_latent_frames_to_patch_t():
    # 85 frames -> 22 latent frames (even): 11; 81 -> 21 -> padded to 22: also 11; 89 -> 23 -> 24: 12
    shape = get_model_shape("cogvideox1.5-5b")
    assert [shape.latent_grid(f, 768, 1360)[0] for f in (81, 85, 89)] == [11, 11, 12]


@pytest.mark.parametrize("kw, match", [
    ({"frames": 50}, r"frames must be 4k\+1 \(e\.g\. 45, 49, 53\), got 50"),
    ({"height": 470}, r"height must be a multiple of 16 .* got 470"),
    ({"width": 0}, r"width must be a positive integer"),
])
def test_video_size_is_validated(kw, match):
    video = dict(zip(("frames", "height", "width"), (49, 480, 720)), **kw)
    with pytest.raises(ValueError, match=match):
        get_model_shape("cogvideox-5b").latent_grid(**video)


def test_report_keys_and_types():
    r = plan_report("cogvideox-5b", 49, 480, 720, sparsity=0.75)
    assert r["model"] == "cogvideox-5b" and r["mode"] == "rf1"
    assert r["grid"] == [13, 30, 45]
    assert r["tokens"] == {"video": 17_550, "text": 226, "total": 17_776}
    assert (r["block_m"], r["block_n"]) == (128, 64)
    assert r["nominal_density"] == pytest.approx(0.25)
    for key in ("executed_video_density", "executed_density"):
        assert set(r[key]) == set(PATTERN_NAMES) and r[key]["dense"] == 1.0
        assert all(isinstance(v, float) and 0.0 < v <= 1.0 for v in r[key].values())
    assert set(r["speedup_bound"]) == {"spatial", "temporal", "textural", "worst"}
    assert r["speedup_bound"]["worst"] == r["speedup_bound"][r["worst_pattern"]] == min(
        r["speedup_bound"][p] for p in ("spatial", "temporal", "textural"))
    assert isinstance(r["forced_video_share"], float)
    json.dumps(r)  # JSON-ready as returned


@pytest.mark.parametrize("order", ["raster", "tiles"])
def test_report_matches_a_direct_plan_at_cogvideox_5b(order):
    r = plan_report("cogvideox-5b", 49, 480, 720, sparsity=0.75, token_order=order)
    assert r["token_order"] == ("raster" if order == "raster" else [1, 8, 16])
    tile = None if order == "raster" else (1, 8, 16)
    layout = TokenLayout.text_first((13, 30, 45), 226, order=tile)
    cfg = RainFusionConfig(sparsity=0.75, token_order=order)
    params = RainFusionMethod(cfg).params(layout)  # solved per layout (tile windows differ from raster ones)
    if order == "raster":
        assert params == pattern_params(cfg, layout.grid)
    plan = RainFusionPlan(layout, params, 128, 64, cfg.probe_budget, cfg.probe_min_rows)
    for i, name in enumerate(PATTERN_NAMES):
        assert r["executed_video_density"][name] == pytest.approx(plan.video_pairs(i) / 17_550 ** 2, rel=1e-12)
        assert r["executed_density"][name] == pytest.approx(plan.density[i], rel=1e-12)
    # first frame as rows and as keys: 1 - (1 - 1/T)^2 of the video x video pairs
    assert r["forced_video_share"] == pytest.approx(1 - (12 / 13) ** 2, rel=1e-12)
    # default schedule: 13 of 50 steps dense (0.25 rounded half up), then layer 0 of 42 in the other 37
    f = (13 * 42 + 37) / (50 * 42)
    assert r["schedule"]["dense_call_share"] == pytest.approx(f)
    for p in ("spatial", "temporal", "textural"):
        assert r["speedup_bound"][p] == pytest.approx(1 / (f + (1 - f) * plan.density[int(PATTERN_NAMES.index(p))]))


def test_forced_share_counts_first_frame_rows_and_keys_exactly():
    layout = TokenLayout.video_first((4, 3, 5), 7)
    hw, v = 15, 60
    forced = sum(1 for q in range(v) for k in range(v) if q < hw or k < hw)
    assert forced_video_share(layout) == forced / v ** 2


def test_video_only_model_and_small_shapes_say_why_they_stay_dense():
    r = plan_report("wan2.1-1.3b", 17, 160, 256, sparsity=0.9)
    assert r["tokens"] == {"video": 5 * 10 * 16, "text": 0, "total": 800}
    assert r["schedule"]["dense_call_share"] == 1.0
    assert "min_video_tokens" in r["schedule"]["always_dense_reason"]
    assert r["speedup_bound"]["worst"] == pytest.approx(1.0)


def test_overrides_go_to_the_config_and_unknown_ones_are_refused():
    r = plan_report("cogvideox-5b", sparsity=0.75, spatial_window=1, dense_steps=0, dense_layers=0)
    assert r["pattern_params"]["spatial_window"] == 1 and r["schedule"]["dense_call_share"] == 0.0
    with pytest.raises(ValueError, match="unknown RainFusionConfig field"):
        plan_report("cogvideox-5b", sparsity=0.75, window=1)


@pytest.mark.parametrize("sigma,target", [(0.75, 0.27), (0.9, 0.12)])
def test_rf2_report_meets_the_budget(sigma, target):
    """rf2 (first-frame sink) executes at most 1 - sparsity of the video pairs, and within one key block per query
    block of it, at CogVideoX-5B 480p."""
    r = plan_report("cogvideox-5b", sparsity=sigma, mode="rf2")
    d = r["executed_video_density"]["rf2"]
    assert 1 - sigma - 64 * 139 * 128 / 17550 ** 2 <= d <= 1 - sigma + 1e-9 and d <= target
    assert r["worst_pattern"] == "rf2" and set(r["speedup_bound"]) == {"rf2", "worst"}


def test_tile_order_report_meets_the_v1_target():
    """Tile order at sigma 0.75: every rf1 pattern executes at most 0.30 of the video pairs (raster: up to 0.51)."""
    r = plan_report("cogvideox-5b", sparsity=0.75, token_order="tiles")
    assert r["token_order"] == [1, 8, 16]
    assert max(r["executed_video_density"][p] for p in ("spatial", "temporal", "textural")) <= 0.30


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "cogvideox-5b", "--sparsity", "0.9", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "13 x 30 x 45" in text and "17,550 video + 226 text" in text and "speedup bound" in text
    report = json.loads(out.read_text())
    assert report["grid"] == [13, 30, 45] and report["sparsity"] == 0.9


@pytest.mark.parametrize("argv", [
    ["--model", "nope", "--sparsity", "0.5"],
    ["--model", "cogvideox-5b", "--sparsity", "0.5", "--frames", "50"],
    ["--model", "hunyuanvideo", "--sparsity", "0.5", "--width", "1000"],
    ["--model", "cogvideox-5b", "--sparsity", "1.5"],
    ["--model", "cogvideox-5b", "--sparsity", "0.5", "--block-n", "0"],
    ["--model", "cogvideox-5b"],
    ["--model", "cogvideox-5b", "--sparsity", "0.5", "--frames", "x"],
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    try:
        rc = main(["plan", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from diffusers_attn.cli import main\n"
        "for argv in (['--help'], ['plan', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    for name in MODEL_SHAPES:
        assert name in out.stdout  # the families are listed in `plan --help`
