"""Exactness of the FlexAttention backend on the project's block lists (CPU, fp32; not a speed benchmark).

    python benchmarks/flex_exactness.py [--json OUT]

For each case: random per-head block lists (about half the key blocks, one empty query block), optional padded key
tail, Nq != Nk where noted. Prints the max abs and relative (Frobenius) error of the ``"flex"`` backend, eager and
compiled (``DIFFATTN_FLEX_COMPILE=0`` / ``1``; compiled on CPU means static shapes and no LSE), and of the PyTorch
reference backend, all against dense fp64 attention with the explicit token mask. Also checks that rows with no
key are exactly zero. Shapes are small: eager FlexAttention materializes the whole score matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from diffusers_attn.kernels import (  # noqa: E402
    block_mask_to_lists,
    block_sparse_attention,
    block_sparse_attention_table,
    lists_to_token_mask,
    masked_attention_reference,
    num_blocks,
)

# name: (B, H, Nq, Nk, head_dim, block_m, block_n, padded, table)
CASES = {
    "hd64 128x64 lists (CogVideoX-like), Nq=Nk": (1, 2, 640, 640, 64, 128, 64, False, False),
    "hd128 128x128 lists, padded tail (HunyuanVideo-like)": (2, 2, 600, 600, 128, 128, 128, True, False),
    "hd64 Nq != Nk, padded, 32x16 lists": (2, 2, 200, 333, 64, 32, 16, True, False),
    "hd128 compact table (3 patterns), padded": (2, 3, 384, 384, 128, 128, 64, True, True),
}


def run_case(B, H, n_q, n_k, D, bm, bn, padded, table, seed=0):
    g = torch.Generator().manual_seed(seed)
    # BSHD storage viewed as BHSD, as the adapters pass it
    q, k, v = (torch.randn(B, n, H, D, generator=g).transpose(1, 2) for n in (n_q, n_k, n_k))
    kpm = None
    if padded:
        kpm = torch.ones(B, n_k, dtype=torch.bool)
        kpm[-1, n_k - bn - 7 :] = False  # a fully padded key block plus a straddling one
    kw = {"block_m": bm, "block_n": bn, "key_padding_mask": kpm}
    if table:
        mask = torch.rand(3, num_blocks(n_q, bm), num_blocks(n_k, bn), generator=g) < 0.5
        mask[0, 1] = False  # an empty query block
        t_idx, t_cnt = block_mask_to_lists(mask)
        head_table = torch.randint(0, 3, (B, H), generator=g, dtype=torch.int32)
        head_table[0, 0] = 0
        idx, cnt = t_idx[head_table.long()], t_cnt[head_table.long()]

        def call(backend):
            return block_sparse_attention_table(q, k, v, t_idx, t_cnt, head_table, backend=backend, **kw)
    else:
        mask = torch.rand(B, H, num_blocks(n_q, bm), num_blocks(n_k, bn), generator=g) < 0.5
        mask[0, 0, 1] = False
        idx, cnt = block_mask_to_lists(mask)

        def call(backend):
            return block_sparse_attention(q, k, v, idx, cnt, backend=backend, **kw)

    tok = lists_to_token_mask(idx, cnt, n_q, n_k, bm, bn)
    if kpm is not None:
        tok = tok & kpm[:, None, None, :]
    exact = masked_attention_reference(q, k, v, tok)
    empty = ~tok.any(-1)
    row = {}
    for label, backend, compile_env in (
        ("flex eager", "flex", "0"),
        ("flex compiled", "flex", "1"),
        ("torch reference", "torch", None),
    ):
        if compile_env is not None:
            os.environ["DIFFATTN_FLEX_COMPILE"] = compile_env
        out = call(backend).double()
        diff = out - exact
        row[label] = {
            "max_abs_error": float(diff.abs().max()),
            "relative_error": float(diff.norm() / exact.norm()),
            "nan": bool(torch.isnan(out).any()),
            "empty_rows_zero": bool((out[empty] == 0).all()),
        }
    row["empty_rows"] = int(empty.sum())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    env = environment(torch.device("cpu"))
    print(f"# {env}")
    print("| case | path | max abs error | relative error | empty rows zero |")
    print("|---|---|---|---|---|")
    results = {}
    for name, case in CASES.items():
        row = results[name] = run_case(*case)
        for path in ("flex eager", "flex compiled", "torch reference"):
            r = row[path]
            print(
                f"| {name} | {path} | {r['max_abs_error']:.2e} | {r['relative_error']:.2e} | "
                f"{r['empty_rows_zero'] and not r['nan']} ({row['empty_rows']} rows) |"
            )
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "cases": results}, indent=2))


if __name__ == "__main__":
    main()
