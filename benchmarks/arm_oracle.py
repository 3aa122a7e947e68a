"""ARM vs an exact oracle on the trained reference models (CPU; recognition quality, not speed).

    python benchmarks/arm_oracle.py                       # both models, sigma 0.5 / 0.75, tau 0.9 / 0.8
    python benchmarks/arm_oracle.py --json outputs/arm_oracle.json --prompts 6

Each generation runs with RainFusion installed (the reference runs' settings: library defaults except
``min_video_tokens=0`` and 16-token blocks, see diffusers_attn/reference_models/quality.py). For every head-call
where ARM ran, the oracle computes the exact kept mass of each candidate's *executed* mask over all S rows (full
fp32 softmax, key padding honoured) and applies the same decision rule to it. Reported per configuration:

* agreement: share of head-calls where ARM's pattern equals the oracle's;
* mass lost: oracle choice's exact kept mass - ARM choice's exact kept mass (0 where they agree; negative where
  ARM kept more because it computed more); mean of the positive part and the maximum;
* shortfall: max(0, tau - exact kept mass of ARM's choice), how far a sparse choice falls below the threshold;
* disagreements near tau: those where every pattern whose estimate and exact mass fall on different sides of tau
  has its exact mass within 0.02 of tau (sampling noise at the threshold, not a wrong pattern).

ARM variants: ``old`` (index-strided probes, argmax rule: the behaviour before the low-discrepancy probes),
``new`` (low-discrepancy probes, cheapest rule: the library default), and the two single changes
(``old-probes+cheapest``, ``new-probes+argmax``) with ``--variants``. Each variant is measured in situ on its own
trajectory (its choices change the latents of later steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from diffusers_attn.install import install_method, remove_attention_acceleration  # noqa: E402
from diffusers_attn.methods.rainfusion import DENSE, SPATIAL, TEMPORAL, TEXTURAL, RainFusionConfig  # noqa: E402
from diffusers_attn.methods.rainfusion import RainFusionMethod  # noqa: E402
from diffusers_attn.methods.rainfusion.config import SPARSE_PATTERNS  # noqa: E402
from diffusers_attn.methods.rainfusion.recognition import choose_patterns  # noqa: E402
from diffusers_attn.reference_models import REFERENCE_MODELS, load_reference_pipeline  # noqa: E402
from diffusers_attn.reference_models.quality import QUALITY_PROMPTS, SMALL_GRID, run  # noqa: E402

PATTERNS = (SPATIAL, TEMPORAL, TEXTURAL)
NEAR = 0.02  # a disagreement is "near tau" when a flipped pattern's exact kept mass is within this of tau
VARIANTS = {  # name: (index-strided probes, rule)
    "old": (True, "argmax"),
    "new": (False, "cheapest"),
    "old-probes+cheapest": (True, "cheapest"),
    "new-probes+argmax": (False, "argmax"),
}


def strided_probe_rows(layout, n_probe: int) -> torch.Tensor:
    """The previous placement: S[floor((i + 1/2) |S| / n)], evenly strided by index."""
    s0, s1 = layout.sparse_rows
    i = torch.arange(n_probe, dtype=torch.float64)
    return (s0 + torch.floor((i + 0.5) * (s1 - s0) / max(n_probe, 1))).long()


class OracleMethod(RainFusionMethod):
    """RainFusion that scores every ARM decision against the exact kept masses (and optionally uses the old
    index-strided probe rows)."""

    def __init__(self, config: RainFusionConfig, strided: bool) -> None:
        super().__init__(config)
        self.strided = strided
        self.rows: list[dict] = []
        self._masks: dict[int, dict[int, torch.Tensor]] = {}

    def plan(self, layout):
        plan = super().plan(layout)
        if self.strided and not getattr(plan, "_strided", False):  # before plan.on() copies the rows to a device
            plan.probe_rows = strided_probe_rows(layout, plan.probe_rows.numel())
            plan.probe_member = {p: m[plan.probe_rows // plan.block_m] for p, m in plan.block_masks.items()}
            plan._strided = True
        return plan

    def attend(self, q, k, v, *, layout, key_padding_mask, scale, call, dense_fn):
        out, record = super().attend(q, k, v, layout=layout, key_padding_mask=key_padding_mask, scale=scale,
                                     call=call, dense_fn=dense_fn)
        dec = getattr(record, "decision", None)
        if dec is not None and dec.recalls is not None:
            self._score(q, k, layout, key_padding_mask, scale, dec, call)
        return out, record

    def _score(self, q, k, layout, kpm, scale, dec, call) -> None:
        plan = self.plan(layout)
        s0, s1 = layout.sparse_rows
        key = id(plan)
        if key not in self._masks:
            self._masks[key] = {p: plan.token_mask(p)[s0:s1].float() for p in PATTERNS}
        masks = self._masks[key]
        d = q.shape[-1]
        with torch.no_grad():
            s = (q[:, :, s0:s1].float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
            if kpm is not None:
                s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1)  # (B, H, |S|, N)
            kept = torch.stack([(p * masks[c]).sum(-1).mean(-1) for c in PATTERNS], dim=-1)  # (B, H, 3)
        cand = [SPARSE_PATTERNS[c] for c in self.config.patterns]
        oracle = choose_patterns(kept, plan, cand, self.config.arm_threshold, self.config.arm_rule).numpy()
        full = torch.cat([torch.ones_like(kept[..., :1]), kept], dim=-1).numpy()  # index = pattern id
        arm = dec.patterns.astype(np.int64)
        for b in range(arm.shape[0]):
            for h in range(arm.shape[1]):
                a, o = int(arm[b, h]), int(oracle[b, h])
                kept, rec = full[b, h, 1:], dec.recalls[b, h]
                # distance to tau of the exact mass of patterns whose estimate lands on the other side of tau
                flips = [abs(float(kept[p - 1]) - self.config.arm_threshold) for p in cand
                         if (rec[p - 1] >= self.config.arm_threshold) != (kept[p - 1] >= self.config.arm_threshold)]
                self.rows.append({
                    "step": call.step, "layer": call.layer_index, "b": b, "head": h, "arm": a, "oracle": o,
                    "kept": [float(x) for x in kept], "recall": [float(x) for x in rec],
                    "lost": 0.0 if a == o else float(full[b, h, o] - full[b, h, a]),
                    "flip_gap": max(flips) if flips else None,
                })


def measure(spec, sigma: float, tau: float, variant: str, prompts, seed: int, probe_min_rows: int = 32) -> dict:
    strided, rule = VARIANTS[variant]
    cfg = RainFusionConfig(sparsity=sigma, arm_threshold=tau, arm_rule=rule, probe_min_rows=probe_min_rows,
                           **SMALL_GRID)
    method = OracleMethod(cfg, strided)
    install_method(spec.pipe, method)
    try:
        for prompt in prompts:
            run(spec, prompt, seed)
    finally:
        remove_attention_acceleration(spec.pipe)
    rows = method.rows
    agree = np.array([r["arm"] == r["oracle"] for r in rows])
    lost = np.array([r["lost"] for r in rows])
    kept_arm = np.array([1.0 if r["arm"] == DENSE else r["kept"][r["arm"] - 1] for r in rows])
    gaps = [r["flip_gap"] for r in rows if r["arm"] != r["oracle"]]
    near = sum(g is not None and g <= NEAR for g in gaps)
    short = np.where(np.array([r["arm"] for r in rows]) != DENSE, np.maximum(0.0, tau - kept_arm), 0.0)
    names = ("dense", "spatial", "temporal", "textural")  # index = pattern id

    def hist(key: str) -> dict[str, int]:
        return {n: sum(r[key] == i for r in rows) for i, n in enumerate(names)}

    return {
        "sigma": sigma, "tau": tau, "variant": variant, "head_calls": len(rows),
        "n_probe": int(next(iter(method._plans.values())).probe_rows.numel()) if method._plans else 0,
        "agreement": float(agree.mean()) if rows else float("nan"),
        "mass_lost_mean": float(np.maximum(lost, 0).mean()) if rows else 0.0,
        "mass_lost_max": float(lost.max()) if rows else 0.0,
        "shortfall_max": float(short.max()) if rows else 0.0,
        "disagreements": len(gaps), "disagreements_near_tau": int(near),
        "arm_patterns": hist("arm"), "oracle_patterns": hist("oracle"),
        "rows": rows,
    }


def table(results: list[dict]) -> str:
    head = ("| model | sigma | tau | ARM | head-calls | agreement | disagreements (within 0.02 of tau) | "
            "mass lost mean / max | shortfall max | ARM: dense/spat/temp/text | oracle: dense/spat/temp/text |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    def h(d: dict) -> str:
        return "/".join(str(d[n]) for n in ("dense", "spatial", "temporal", "textural"))

    for r in results:
        lines.append(f"| {r['model']} | {r['sigma']:.2f} | {r['tau']:.1f} | {r['variant']} | {r['head_calls']} | "
                     f"{100 * r['agreement']:.1f}% | {r['disagreements']} ({r['disagreements_near_tau']}) | "
                     f"{r['mass_lost_mean']:.4f} / {r['mass_lost_max']:.3f} | "
                     f"{r['shortfall_max']:.3f} | {h(r['arm_patterns'])} | {h(r['oracle_patterns'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(REFERENCE_MODELS))
    p.add_argument("--sigmas", default="0.5,0.75")
    p.add_argument("--taus", default="0.9,0.8")
    p.add_argument("--prompts", type=int, default=3, help=f"first n of the {len(QUALITY_PROMPTS)} quality prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="old,new", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--json", default=None)
    p.add_argument("--rows", action="store_true", help="keep every head-call in the JSON")
    p.add_argument("--probe-min-rows", type=int, default=RainFusionConfig().probe_min_rows,
                   help="probe_min_rows (the probe count on these small grids)")
    args = p.parse_args()
    torch.set_num_threads(1)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    prompts = QUALITY_PROMPTS[: args.prompts]
    results, t0 = [], time.perf_counter()
    for name in args.models.split(","):
        spec = load_reference_pipeline(name)
        for sigma in (float(x) for x in args.sigmas.split(",")):
            for tau in (float(x) for x in args.taus.split(",")):
                for variant in variants:
                    r = measure(spec, sigma, tau, variant, prompts, args.seed, args.probe_min_rows)
                    r["model"] = name
                    results.append(r)
                    print(table([r]).splitlines()[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n" + table(results))
    if args.json:
        settings = {**SMALL_GRID, "probe_min_rows": args.probe_min_rows, "prompts": list(prompts), "seed": args.seed}
        out = {"env": environment(torch.device("cpu")), "settings": settings,
               "results": [r if args.rows else {k: v for k, v in r.items() if k != "rows"} for r in results]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
