"""Telemetry: what the accelerated attention actually computed.

Methods record, per attention call, how many (query, key) pairs were computed against the dense count, which
pattern each head used, and why a call fell back to dense. Timings use CUDA events on GPU (no sync on the hot
path; resolved when stats are read) and ``perf_counter`` on CPU. Numbers a method leaves on the device (its
per-head decisions, valid key counts) are kept as pending records and read in one copy when the stats are read.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

#: RainFusion's pattern names: the default order of the histogram (other methods add their own names)
PATTERN_NAMES = ("dense", "spatial", "temporal", "textural")
FALLBACK_NAME = "fallback"  # a whole call that ran the stock dense path


class _Timers:
    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()
        self.cuda: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def time(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.cuda.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.cpu[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        out = dict(self.cpu)
        for name, pairs in self.cuda.items():
            if pairs:
                pairs[-1][1].synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
        return out


@dataclass
class _LayerAccum:
    calls: int = 0
    heads: int = 0
    head_counts: dict[str, np.ndarray] = field(default_factory=dict)  # pattern -> (H,) head-calls
    computed: float = 0.0  # computed (q, k) pairs x head_dim, summed over heads and batch
    total: float = 0.0
    video_computed: float = 0.0
    video_total: float = 0.0
    recall_sum: np.ndarray | None = None  # (H, R) mean-recall accumulator
    recall_n: int = 0


class StatsRecorder:
    """Per-transformer accumulator, written only by the processors (methods return records). Reset at the start
    of every generation."""

    def __init__(self) -> None:
        self.method: str | None = None
        self.layers_per_forward = 0  # accelerated attention layers, set when a method is installed
        self.static_info: dict[str, Any] = {}  # set at install, kept across resets
        self.reset()

    def reset(self) -> None:
        """Clear everything recorded (the method name and the install-time info are kept)."""
        self.layers: dict[int, _LayerAccum] = {}
        self.fallbacks: Counter[str] = Counter()
        self.timers = _Timers()
        self.forwards = 0  # transformer forwards of this generation
        self.kernel_calls: Counter[str] = Counter()  # sparse executions per kernel backend
        self.slow_path: Counter[str] = Counter()  # CUDA calls that could not use the GPU kernel, by reason
        self.steps_seen = 0
        self.pattern_names: list[str] = []  # every pattern name recorded, in order of first appearance
        self.groups: dict[int, list[float]] = {}  # sub-step group -> [video_computed, video_total, computed, total]
        self.group_name = "group"
        self.pattern_video: dict[str, list[float]] = {}  # pattern -> [video pairs computed, video pairs total]
        self.info: dict[str, Any] = dict(self.static_info)
        self._pending: list[tuple[int, Any, dict[str, Any]]] = []  # (layer, record, record() kwargs), call order

    #: pending records kept before they are read on the host anyway (bounds the memory they hold)
    max_pending = 4096

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def record_method(self, layer: int, record: Any, *, head_offset: int = 0, total_heads: int | None = None) -> None:
        """Record a method's :class:`~diffusers_attn.methods.base.MethodRecord` whose numbers are on the host."""
        self.record(layer, head_patterns=record.head_patterns, computed=record.computed, total=record.total,
                    video_computed=record.video_computed, video_total=record.video_total,
                    pattern_names=record.pattern_names, recalls=record.recalls,
                    fallback_reason=record.fallback_reason, head_offset=head_offset, total_heads=total_heads,
                    group=record.group, group_name=record.group_name,
                    pattern_video_pairs=record.pattern_video_pairs)

    def record_pending(self, layer: int, record: Any, **kwargs: Any) -> None:
        """Keep a method record whose numbers are still on the device (``record.pending``; records without one
        may queue behind it to keep the call order); read in :meth:`flush`."""
        self._pending.append((layer, record, kwargs))
        if len(self._pending) >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        """Read every pending record's device tensors on the host (one copy per device) and record them in call
        order. Called by :meth:`summary`; a no-op when nothing is pending."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, rec, _ in pending:
            for t in rec.pending.tensors if rec.pending is not None else ():
                by_device.setdefault(t.device, []).append(t.detach().reshape(-1).to(torch.float64))
        host = {}
        for dev, ts in by_device.items():
            flat = torch.cat(ts).cpu().numpy()  # the one device->host copy of everything pending on this device
            host[dev] = iter(np.split(flat, np.cumsum([t.numel() for t in ts])[:-1]))
        for layer, rec, kwargs in pending:
            if rec.pending is None:
                self.record_method(layer, rec, **kwargs)
                continue
            arrays = [next(host[t.device]).reshape(t.shape) for t in rec.pending.tensors]
            fields = rec.pending.finish(arrays)
            self.record(layer, pattern_names=rec.pattern_names, fallback_reason=rec.fallback_reason,
                        group=rec.group, group_name=rec.group_name, **fields, **kwargs)

    def _layer(self, layer: int, heads: int) -> _LayerAccum:
        acc = self.layers.get(layer)
        if acc is None:
            acc = self.layers[layer] = _LayerAccum(heads=heads)
        elif acc.heads != heads:
            acc.heads, acc.head_counts, acc.recall_sum, acc.recall_n = heads, {}, None, 0
        return acc

    def record(
        self,
        layer: int,
        *,
        head_patterns: np.ndarray,
        computed: float,
        total: float,
        video_computed: float,
        video_total: float,
        pattern_names: tuple[str, ...] = PATTERN_NAMES,
        recalls: np.ndarray | None = None,
        fallback_reason: str | None = None,
        head_offset: int = 0,
        total_heads: int | None = None,
        group: int | None = None,
        group_name: str = "group",
        pattern_video_pairs: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        """Record one attention call. ``head_patterns`` is (B, H) of indices into ``pattern_names`` (negative:
        not counted); a call with a ``fallback_reason`` counts every head as ``fallback``.

        ``computed``/``total`` count (q, k) pairs times head_dim, summed over batch and heads. Under context
        parallelism a rank records its heads ``[head_offset, head_offset + H)`` of ``total_heads``.
        ``pattern_video_pairs`` splits the video pairs by pattern (name -> (computed, total)); without it a call
        whose counted heads all ran one pattern (or a fallback) is attributed to that pattern, a mixed call to none.
        """
        B, H = head_patterns.shape
        acc = self._layer(layer, total_heads or H)
        acc.calls += 1
        names = list(pattern_names) + [FALLBACK_NAME]
        for name in names:
            if name not in self.pattern_names:
                self.pattern_names.append(name)
            acc.head_counts.setdefault(name, np.zeros(acc.heads, dtype=np.int64))
        rows = slice(head_offset, head_offset + H)
        if fallback_reason is not None:
            acc.head_counts[FALLBACK_NAME][rows] += B
            self.fallbacks[fallback_reason] += 1
        else:
            for p, name in enumerate(pattern_names):
                acc.head_counts[name][rows] += (head_patterns == p).sum(0)
        acc.computed += computed
        acc.total += total
        acc.video_computed += video_computed
        acc.video_total += video_total
        if pattern_video_pairs is None:
            if fallback_reason is not None:
                pattern_video_pairs = {FALLBACK_NAME: (video_computed, video_total)}
            else:
                used = np.unique(head_patterns[head_patterns >= 0])
                if used.size == 1 and video_total:
                    pattern_video_pairs = {pattern_names[int(used[0])]: (video_computed, video_total)}
        for name, (vc, vt) in (pattern_video_pairs or {}).items():
            pv = self.pattern_video.setdefault(name, [0.0, 0.0])
            pv[0] += vc
            pv[1] += vt
        if recalls is not None:
            r = np.zeros((acc.heads, recalls.shape[-1]))
            r[rows] = recalls.reshape(B, H, -1).sum(0)
            acc.recall_sum = r if acc.recall_sum is None else acc.recall_sum + r
            acc.recall_n += B
        if group is not None:  # a sub-step (VAR: a scale) counts as a step
            self.group_name = group_name
            self.steps_seen = max(self.steps_seen, group + 1)
            g = self.groups.setdefault(group, [0.0, 0.0, 0.0, 0.0])
            g[0] += video_computed
            g[1] += video_total
            g[2] += computed
            g[3] += total

    def summary(self) -> "AttentionStats":
        self.flush()
        layers = []
        hist: Counter[str] = Counter()
        computed = total = vcomp = vtot = 0.0
        calls = 0
        for idx in sorted(self.layers):
            acc = self.layers[idx]
            calls += acc.calls
            computed += acc.computed
            total += acc.total
            vcomp += acc.video_computed
            vtot += acc.video_total
            names = [n for n in self.pattern_names if n in acc.head_counts]
            for name in names:
                hist[name] += int(acc.head_counts[name].sum())
            per_head = [
                {n: int(acc.head_counts[n][h]) for n in names if acc.head_counts[n][h]} for h in range(acc.heads)
            ]
            dominant = [max(row, key=row.get) if row else "none" for row in per_head]
            layers.append(
                LayerStats(
                    layer=idx,
                    calls=acc.calls,
                    density=acc.computed / acc.total if acc.total else 1.0,
                    video_density=acc.video_computed / acc.video_total if acc.video_total else 1.0,
                    head_patterns=per_head,
                    dominant_patterns=dominant,
                    mean_recall=(
                        (acc.recall_sum / acc.recall_n).round(4).tolist() if acc.recall_n else None
                    ),
                )
            )
        secs = self.timers.seconds()
        info = dict(self.info)
        if self.groups:
            g = sorted(self.groups.items())
            info[f"kept_attention_share_per_{self.group_name}"] = {k: round(a[0] / a[1], 6) for k, a in g if a[1]}
            info[f"computed_score_share_per_{self.group_name}"] = {k: round(a[2] / a[3], 6) for k, a in g if a[3]}
        head_calls = sum(hist.values())
        return AttentionStats(
            method=self.method,
            calls=calls,
            # Calls a cache (FirstBlockCache, PAB, ...) skipped never reach a processor: expected minus recorded.
            skipped_calls=max(0, self.forwards * self.layers_per_forward - calls),
            steps=self.steps_seen,
            density=computed / total if total else 1.0,
            video_density=vcomp / vtot if vtot else 1.0,
            pattern_histogram=dict(hist),
            dense_fallbacks=dict(self.fallbacks),
            dense_fallback_rate=(hist.get("fallback", 0) / head_calls) if head_calls else 0.0,
            pattern_video_density={n: self.pattern_video[n][0] / self.pattern_video[n][1]
                                   for n in self.pattern_names if n in self.pattern_video and self.pattern_video[n][1]},
            timings_ms={k: v * 1000.0 for k, v in sorted(secs.items())},
            kernel_backends=dict(self.kernel_calls),
            slow_path=dict(self.slow_path),
            layers=layers,
            info=info,
        )


@dataclass
class LayerStats:
    layer: int
    calls: int
    density: float
    video_density: float
    head_patterns: list[dict[str, int]]  # per head: pattern -> number of calls
    dominant_patterns: list[str]  # per head: the most frequent pattern
    mean_recall: list[list[float]] | None  # per head: ARM recall of (spatial, temporal, textural)


@dataclass
class AttentionStats:
    """What the accelerated attention computed during the last generation (see docs/rainfusion.md, "Reading the stats").

    * ``density``: FLOP-weighted share of (query, key) pairs actually computed, over all tokens, including the
      always-dense text/first-frame region and block rounding (1.0 = dense).
    * ``video_density``: the same restricted to video queries x video keys.
    * ``pattern_histogram``: head-calls per pattern (``fallback`` = whole call ran the stock dense path); the
      names are the method's own (RainFusion: dense/spatial/temporal/textural; LiteVAR: full/windowed/cfg_shared/
      windowed+cfg_shared).
    * ``pattern_video_density``: per pattern (RainFusion rf1: spatial/temporal/textural/dense; rf2: ``rf2``;
      ``fallback``: whole calls that ran dense), the executed video x video density of the head-calls that ran it,
      block rounding and forced regions included.
    * ``dense_fallbacks``: reason -> number of layer calls that ran dense.
    * ``skipped_calls``: layer calls that never reached the processor because a cache hook (FirstBlockCache,
      PyramidAttentionBroadcast, ...) skipped the block or reused its attention output; they compute nothing and
      are not in ``density``.
    * ``timings_ms``: ``arm`` (pattern recognition), ``plan`` (block-list building, cached per shape),
      ``gather`` (textural key gather), ``attention`` (sparse execution), summed over the generation.
    * ``kernel_backends``: sparse layer calls per kernel backend (``triton`` on GPU, ``torch`` on CPU).
    * ``slow_path``: reason -> CUDA layer calls that ran the exact but slow PyTorch path instead of the GPU kernel
      (e.g. Triton missing, an unsupported head_dim or block size); also logged once as a warning.
    """

    method: str | None
    calls: int
    skipped_calls: int
    steps: int
    density: float
    video_density: float
    pattern_histogram: dict[str, int]
    dense_fallbacks: dict[str, int]
    dense_fallback_rate: float
    timings_ms: dict[str, float]
    kernel_backends: dict[str, int] = field(default_factory=dict)
    slow_path: dict[str, int] = field(default_factory=dict)
    layers: list[LayerStats] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: pipelines with several accelerated transformers (Wan 2.2 A14B): each one's stats; the fields above are
    #: their totals (``steps``: of the whole run) and ``layers`` is empty
    per_transformer: dict[str, AttentionStats] = field(default_factory=dict)
    pattern_video_density: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"diffusers-attn stats ({self.method or 'no method'}): {self.calls} attention calls over "
            f"{self.steps} steps" + (f" ({self.skipped_calls} more skipped by a cache)" if self.skipped_calls else ""),
            f"  realized density: {self.density:.3f} (all tokens), {self.video_density:.3f} (video x video)",
        ]
        if self.pattern_histogram:
            hist = ", ".join(f"{k}={v}" for k, v in self.pattern_histogram.items() if v)
            lines.append(f"  head-calls per pattern: {hist}")
        if self.pattern_video_density:
            pvd = ", ".join(f"{k} {v:.3f}" for k, v in self.pattern_video_density.items())
            lines.append(f"  executed video x video density per pattern: {pvd}")
        if self.dense_fallbacks:
            fb = "; ".join(f"{k}: {v}" for k, v in sorted(self.dense_fallbacks.items()))
            lines.append(f"  dense fallbacks (layer calls): {fb}")
        if self.timings_ms:
            tm = ", ".join(f"{k} {v:.1f} ms" for k, v in self.timings_ms.items())
            lines.append(f"  time: {tm}")
        if self.kernel_backends:
            lines.append("  sparse kernels: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kernel_backends.items())))
        if self.slow_path:
            sp = "; ".join(f"{k}: {v}" for k, v in sorted(self.slow_path.items()))
            lines.append(f"  SLOW PATH on GPU (PyTorch instead of the Triton kernel): {sp}")
        for layer in self.layers:
            pats = "".join(_ABBREV.get(p, "?") for p in layer.dominant_patterns)
            lines.append(
                f"  layer {layer.layer:3d}: density {layer.density:.3f}, video {layer.video_density:.3f}, "
                f"heads [{pats}]"
            )
        if self.layers:
            used = {p for layer in self.layers for p in layer.dominant_patterns} - {"none"}
            legend = ", ".join(f"{_ABBREV.get(p, '?')} {p}" for p in sorted(used, key=lambda p: _ABBREV.get(p, "?")))
            lines.append(f"  (heads: {legend})")
        for name, sub in self.per_transformer.items():
            lines.append(f"  [{name}] {sub.calls} attention calls, steps seen up to {sub.steps}")
            lines.extend("  " + line for line in str(sub).splitlines()[1:])
        return "\n".join(lines)


def combine_stats(recorders: dict[str, StatsRecorder]) -> AttentionStats:
    """Totals over several transformers of one pipeline run (each one's summary in ``per_transformer``)."""
    per = {name: rec.summary() for name, rec in recorders.items()}
    recs = list(recorders.values())

    def pairs(attr: str) -> float:
        return sum(getattr(acc, attr) for rec in recs for acc in rec.layers.values())

    def add(dicts: list[dict[str, Any]]) -> dict[str, Any]:
        out: Counter = Counter()
        for d in dicts:
            out.update(d)
        return dict(out)

    computed, total, vcomp, vtot = (pairs(a) for a in ("computed", "total", "video_computed", "video_total"))
    hist = add([s.pattern_histogram for s in per.values()])
    head_calls = sum(hist.values())
    info: dict[str, Any] = {}
    for s in per.values():
        info.update(s.info)
    pv: dict[str, list[float]] = {}
    for rec in recs:
        for name, (c, t) in rec.pattern_video.items():
            acc = pv.setdefault(name, [0.0, 0.0])
            acc[0] += c
            acc[1] += t
    first = next(iter(per.values()))
    return AttentionStats(
        method=first.method,
        calls=sum(s.calls for s in per.values()),
        skipped_calls=sum(s.skipped_calls for s in per.values()),
        steps=max(s.steps for s in per.values()),  # a shared step counter: the last one seen is the run's
        density=computed / total if total else 1.0,
        video_density=vcomp / vtot if vtot else 1.0,
        pattern_histogram=hist,
        dense_fallbacks=add([s.dense_fallbacks for s in per.values()]),
        dense_fallback_rate=(hist.get("fallback", 0) / head_calls) if head_calls else 0.0,
        timings_ms=add([s.timings_ms for s in per.values()]),
        kernel_backends=add([s.kernel_backends for s in per.values()]),
        slow_path=add([s.slow_path for s in per.values()]),
        layers=[],
        info=info,
        per_transformer=per,
        pattern_video_density={n: c / t for n, (c, t) in pv.items() if t},
    )


_ABBREV = {"dense": "D", "spatial": "S", "temporal": "T", "textural": "X", "fallback": "F", "none": ".",
           "full": "D", "windowed": "W", "cfg_shared": "C", "windowed+cfg_shared": "B", "rf2": "R"}
