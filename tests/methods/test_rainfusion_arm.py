"""RainFusion's ARM recognizer: probe placement and probe cost."""

from __future__ import annotations

import pytest
import torch

from diffusers_attn.layout import TokenLayout
from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionPlan, pattern_params
from diffusers_attn.methods.rainfusion.recognition import grid_to_index, probe_rows


def _thw(layout: TokenLayout, rows: torch.Tensor):
    t, h, w, _ = layout.token_coords()
    return t[rows], h[rows], w[rows]


# --------------------------------------------------------------------------- probe placement
def test_probe_rows_spread_over_frames_rows_and_columns():
    """CogVideoX-5B 480p: 72 probes. An index stride of |S| / 72 = 225 = 5 W put them all in one column at 6
    (h, w) positions; the low-discrepancy set covers every frame and most rows and columns."""
    layout = TokenLayout.text_first((13, 30, 45), 226)
    rows = probe_rows(layout, 72)
    s0, s1 = layout.sparse_rows
    assert rows.dtype == torch.long and rows.numel() == 72 == rows.unique().numel()
    assert ((rows >= s0) & (rows < s1)).all() and bool((rows.diff() > 0).all())
    t, h, w = _thw(layout, rows)
    assert t.unique().numel() == 12 and torch.bincount(t - 1).tolist() == [6] * 12  # equal share per frame
    assert h.unique().numel() == 30 and w.unique().numel() >= 30
    assert (h * layout.width + w).unique().numel() == 72
    assert torch.equal(rows, probe_rows(layout, 72))  # deterministic


@pytest.mark.parametrize("layout", [TokenLayout.text_first((3, 4, 5), 7), TokenLayout.video_first((4, 3, 3), 5)])
def test_probe_rows_are_distinct_for_every_count(layout):
    """Rounding collisions are refilled: exactly n distinct S rows for every n up to |S| (then all of S)."""
    s0, s1 = layout.sparse_rows
    for n in range(1, s1 - s0 + 3):
        rows = probe_rows(layout, n)
        assert rows.numel() == min(n, s1 - s0) == rows.unique().numel(), n
        assert ((rows >= s0) & (rows < s1)).all(), n
    assert torch.equal(probe_rows(layout, s1 - s0), torch.arange(s0, s1))


def test_grid_to_index_is_the_raster_map():
    for layout in (TokenLayout.text_first((5, 7, 9), 11), TokenLayout.video_first((6, 6, 10), 13)):
        T, H, W = layout.grid
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
        idx = grid_to_index(layout, t.flatten(), h.flatten(), w.flatten())
        assert torch.equal(idx, torch.arange(layout.video_offset, layout.video_offset + layout.num_video))
        rows = probe_rows(layout, 20)
        assert torch.equal(grid_to_index(layout, *_thw(layout, rows)), rows)


@pytest.mark.parametrize("order", [(1, 2, 4), (2, 3, 3)])
def test_probe_rows_follow_a_tiled_token_order(order):
    """With video tokens in tiles, the probes sit at the same (t, h, w) cells as in raster order."""
    raster = TokenLayout.text_first((5, 7, 9), 11)
    tiled = TokenLayout.text_first((5, 7, 9), 11, order=order)
    for n in (9, 40):
        a, b = probe_rows(raster, n), probe_rows(tiled, n)
        assert bool((b.diff() > 0).all()) and not torch.equal(a, b)
        assert sorted(zip(*(x.tolist() for x in _thw(raster, a)))) == sorted(zip(*(x.tolist() for x in _thw(tiled, b))))


@pytest.mark.parametrize("grid,text", [((13, 30, 45), 226), ((21, 30, 52), 0), ((4, 32, 32), 0)],
                         ids=["cogvideox-480p", "wan-1.3b-480p", "smallest-default-sparse-call"])
def test_probe_flops_within_half_a_percent(grid, text):
    """Probing costs 2 n_q N d FLOPs against 4 N^2 d for the call: n_q / (2N) <= 0.5% with the defaults, down to the
    smallest call they let run sparse (min_video_tokens=4096, where the 32-row floor gives 0.39%)."""
    cfg = RainFusionConfig()
    layout = TokenLayout.video_first(grid, text) if text == 0 else TokenLayout.text_first(grid, text)
    assert layout.num_video >= cfg.min_video_tokens
    plan = RainFusionPlan(layout, pattern_params(cfg, grid), cfg.block_m, cfg.block_n, cfg.probe_budget,
                          cfg.probe_min_rows)
    n_q, N = plan.probe_rows.numel(), layout.seq_len
    assert n_q >= cfg.probe_min_rows
    assert (2 * n_q * N) / (4 * N * N) <= 0.005
