"""The toy FEAT training script runs end to end: progress, checkpoints that load, samples, a log."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("train_feat_toy", ROOT / "demos" / "train_feat_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_videos_move():
    mod = load_script()
    x = mod.toy_videos(4, 5, 8, 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 5, 4, 8, 8) and x.abs().sum() > 0
    moving = [(x[i, 1:] - x[i, :-1]).abs().sum() > 0 for i in range(4)]
    assert any(moving)


def test_training_script_smoke(tmp_path):
    from diffusers_attn.pipelines.feat import FEATTransformer3DModel

    mod = load_script()
    log = mod.main(["--steps", "4", "--ckpt-every", "2", "--sample-steps", "2", "--batch", "2", "--hidden", "32",
                    "--groups", "1", "--out", str(tmp_path), "--device", "cpu"])
    assert [c["step"] for c in log["checkpoints"]] == [2, 4]
    assert all(math.isfinite(c["loss_ema"]) and math.isfinite(c["sample_nn_mse"]) for c in log["checkpoints"])
    assert (tmp_path / "checkpoint-4" / "samples.png").exists()
    assert json.loads((tmp_path / "log.json").read_text())["params"] == log["params"]
    m = FEATTransformer3DModel.from_pretrained(tmp_path / "checkpoint-4")
    assert m.config.hidden_size == 32
