"""Shape-only execution plans of the RainFusion patterns: block lists, the textural gather, probe rows, pair counts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...kernels import block_mask_to_lists, expand_block_mask, num_blocks
from ...layout import TokenLayout
from .config import DENSE, SPATIAL, TEMPORAL, TEXTURAL, PatternParams
from .recognition import probe_rows
from .windows import BlockBoxes, spatial_mask, temporal_mask


def _raster_masks(t, hh, qb, kb, s_tok, sizes, params, always):
    """Frame-band and row-band block masks in raster order, from which frames / rows each block holds."""
    M, K, T, H = sizes

    def incidence(blocks: torch.Tensor, idx: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
        m = torch.zeros(n_rows, n_cols)
        m[blocks[s_tok], idx[s_tok]] = 1.0
        return m

    q_frames, k_frames = incidence(qb, t, M, T), incidence(kb, t, K, T)
    q_rows, k_rows = incidence(qb, hh, M, H), incidence(kb, hh, K, H)
    band_t = ((torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs() <= params.window).float()
    band_h = ((torch.arange(H)[:, None] - torch.arange(H)[None, :]).abs() <= params.rows).float()
    need_sp = ((((q_frames @ band_t) > 0).float() @ k_frames.T) > 0) | always
    need_tp = ((((q_rows @ band_h) > 0).float() @ k_rows.T) > 0) | always
    return need_sp, need_tp


class RainFusionPlan:
    """Shape-only execution plan for one (layout, params, block sizes): block lists per pattern, the textural
    gather index, ARM probe rows and the per-pattern pair counts used for realized density.

    Built once per shape on CPU and cached; :meth:`on` returns device copies (cached per device).
    """

    def __init__(
        self,
        layout: TokenLayout,
        params: PatternParams,
        block_m: int,
        block_n: int,
        probe_budget: float,
        probe_min_rows: int,
    ) -> None:
        self.layout, self.params = layout, params
        self.block_m, self.block_n = block_m, block_n
        T, H, W = layout.grid
        HW, N = layout.frame_tokens, layout.seq_len
        M, K = num_blocks(N, block_m), num_blocks(N, block_n)
        self.num_m, self.num_k, self.n = M, K, N

        pos = torch.arange(N)
        t, hh, ww, txt = layout.token_coords()
        vid = t >= 0
        dense_tok = (vid & (t == 0)) | txt
        s_tok = vid & (t >= 1)
        qb, kb = pos // block_m, pos // block_n

        q_dense = torch.zeros(M, dtype=torch.bool)
        q_dense[qb[dense_tok]] = True
        k_always = torch.zeros(K, dtype=torch.bool)
        k_always[kb[dense_tok]] = True

        always = k_always[None, :] | q_dense[:, None]
        if layout.order is not None:  # tiles: blocks are 3-D boxes, windows are unions of boxes
            qbox = BlockBoxes.of((t, hh, ww), s_tok, block_m, M, layout.order)
            kbox = BlockBoxes.of((t, hh, ww), s_tok, block_n, K, layout.order)
            need_sp = spatial_mask(qbox, kbox, params.window, params.edge_radius) | always
            need_tp = temporal_mask(qbox, kbox, params.rows, params.cols) | always
        else:
            need_sp, need_tp = _raster_masks(t, hh, qb, kb, s_tok, (M, K, T, H), params, always)
        self.block_masks = {SPATIAL: need_sp, TEMPORAL: need_tp}
        self._q_dense = q_dense
        self.tables = {p: block_mask_to_lists(m) for p, m in self.block_masks.items()}

        strided = s_tok & (hh % params.stride == 0) & (ww % params.col_stride == 0)
        self.textural_keys = dense_tok | strided  # token-exact key set of S rows
        self.gather_index = self.textural_keys.nonzero().squeeze(-1)

        # ARM probe rows: a low-discrepancy set over the (t >= 1, h, w) box (recognition.probe_rows).
        s0, s1 = layout.sparse_rows
        n_s = s1 - s0
        n_probe = min(max(math.ceil(2 * probe_budget * N), probe_min_rows), n_s)
        self.probe_rows = probe_rows(layout, n_probe)
        self.probe_member = {p: m[self.probe_rows // block_m] for p, m in self.block_masks.items()}

        # Pair accounting (float64 numpy; shape-only, padding applied per call).
        self._rows_pb = np.bincount(qb.numpy(), minlength=M).astype(np.float64)
        self._vrows_pb = np.bincount(qb[vid].numpy(), minlength=M).astype(np.float64)
        self._keys_pb = np.bincount(kb.numpy(), minlength=K).astype(np.float64)
        vkeys_pb = np.bincount(kb[vid].numpy(), minlength=K).astype(np.float64)
        self._colw = {p: self._rows_pb @ m.numpy().astype(np.float64) for p, m in self.block_masks.items()}
        self._video_pairs = {
            p: float(self._vrows_pb @ m.numpy().astype(np.float64) @ vkeys_pb) for p, m in self.block_masks.items()
        }
        n_strided = int(strided.sum())
        self._video_pairs[TEXTURAL] = float(HW * layout.num_video + n_s * (HW + n_strided))
        self._video_pairs[DENSE] = float(layout.num_video) ** 2
        self.n_sparse_rows = n_s
        self.n_gather = int(self.gather_index.numel())
        self.density = {
            DENSE: 1.0,
            SPATIAL: float(self._colw[SPATIAL] @ self._keys_pb) / (N * N),
            TEMPORAL: float(self._colw[TEMPORAL] @ self._keys_pb) / (N * N),
            TEXTURAL: (float(N - n_s) * N + n_s * self.n_gather) / (N * N),
        }
        self._device_cache: dict[torch.device, dict[str, Any]] = {}
        self._pairs_cache: dict[tuple[int, int], tuple[float, float]] = {}

    def pattern_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact per-pattern lists ``[5, M, K_max]`` / ``[5, M]`` indexed by pattern id: dense (all blocks),
        spatial, temporal, for textural heads only the always-dense query blocks (their other rows take the
        gather path), and ``SKIP`` (no block: a head computed elsewhere in the same call)."""
        full = torch.ones(self.num_m, self.num_k, dtype=torch.bool)
        rows_only = self._q_dense[:, None].expand(self.num_m, self.num_k)
        none = torch.zeros(self.num_m, self.num_k, dtype=torch.bool)
        masks = torch.stack([full, self.block_masks[SPATIAL], self.block_masks[TEMPORAL], rows_only, none])
        return block_mask_to_lists(masks)

    def textural_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lists ``[2, M_s, K_c]`` / ``[2, M_s]`` of the textural heads' S rows over the gathered keys: row 1 all
        gathered key blocks, row 0 none (heads of other patterns)."""
        m_s = num_blocks(self.n_sparse_rows, self.block_m)
        k_c = num_blocks(self.n_gather, self.block_n)
        masks = torch.stack([torch.zeros(m_s, k_c, dtype=torch.bool), torch.ones(m_s, k_c, dtype=torch.bool)])
        return block_mask_to_lists(masks)

    def on(self, device: torch.device) -> dict[str, Any]:
        """Device copies of the tensors the hot path needs (built once per device; the Triton-path tables are
        added on first use by ``execution``)."""
        d = self._device_cache.get(device)
        if d is None:
            member = torch.stack([self.probe_member[SPATIAL], self.probe_member[TEMPORAL]]).to(torch.float32)
            d = {
                "tables": {p: (i.to(device), c.to(device)) for p, (i, c) in self.tables.items()},
                "gather_index": self.gather_index.to(device),
                "probe_rows": self.probe_rows.to(device),
                "probe_member_stack": member.to(device),
                # (P*K, 2) membership / P: ARM's recalls are one matmul with the probe masses
                "probe_member_mat": (member.flatten(1).T / member.shape[1]).contiguous().to(device),
                "textural_keys": self.textural_keys.to(device=device, dtype=torch.float32),
            }
            self._device_cache[device] = d
        return d

    def pairs(self, pattern: int, padded_text: int) -> tuple[float, float]:
        """(computed, total) (q, k) pairs of one head for ``pattern`` with ``padded_text`` padded text keys."""
        key = (pattern, padded_text)
        hit = self._pairs_cache.get(key)
        if hit is not None:
            return hit
        L, N = self.layout, self.n
        n_k_valid = N - padded_text
        total = float(N) * n_k_valid
        if pattern == DENSE:
            computed = total
        elif pattern == TEXTURAL:
            computed = float(N - self.n_sparse_rows) * n_k_valid + float(self.n_sparse_rows) * (
                self.n_gather - padded_text
            )
        else:
            keys = self._keys_pb.copy()
            if padded_text:
                pad_pos = np.arange(L.text_offset + L.text_len - padded_text, L.text_offset + L.text_len)
                keys -= np.bincount(pad_pos // self.block_n, minlength=self.num_k)
            computed = float(self._colw[pattern] @ keys)
        self._pairs_cache[key] = (computed, total)
        return computed, total

    def video_pairs(self, pattern: int) -> float:
        return self._video_pairs[pattern]

    def token_mask(self, pattern: int) -> torch.Tensor:
        """The (N, N) boolean mask this plan executes for ``pattern`` (for tests and oracles; O(N^2))."""
        N = self.n
        if pattern == DENSE:
            return torch.ones(N, N, dtype=torch.bool)
        if pattern == TEXTURAL:
            mask = torch.ones(N, N, dtype=torch.bool)
            s0, s1 = self.layout.sparse_rows
            mask[s0:s1] = self.textural_keys[None, :]
            return mask
        return expand_block_mask(self.block_masks[pattern], N, N, self.block_m, self.block_n)

