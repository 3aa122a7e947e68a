"""GPU correctness check of the Triton block-sparse kernel at real shapes (bf16 and fp16).

    python benchmarks/gpu_check.py                          # exits non-zero on any failure
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # CPU logic check at tiny shapes

For each case: random per-head block lists (and the RainFusion plans of the real layouts), optional key padding.
Sampled query blocks (first, last, and random ones) are compared with an fp32 masked-softmax reference built from
the same lists. Pass criteria: no NaN/inf; relative error <= 1e-2; max abs error <= 2x the error of the same-dtype
SDPA with the equivalent boolean mask on the same rows (the FlashAttention test rule) + 1e-3; LSE within 1e-2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from diffusers_attn.kernels import block_mask_to_lists, block_sparse_attention, block_sparse_attention_table, num_blocks


def token_mask_rows(idx, cnt, m, n_k, bm, bn, kpm):
    """(B, H, block rows, n_k) boolean mask of query block m (relaxed semantics, key padding applied)."""
    B, H = idx.shape[:2]
    K = num_blocks(n_k, bn)
    blocks = torch.zeros(B, H, K, dtype=torch.bool, device=idx.device)
    valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[:, :, m, None]
    blocks.scatter_(-1, idx[:, :, m].long(), valid)  # padding slots repeat valid indices: OR is implied below
    hits = torch.zeros(B, H, K, dtype=torch.int32, device=idx.device)
    hits.scatter_add_(-1, idx[:, :, m].long(), valid.int())
    tok = (hits > 0).repeat_interleave(bn, dim=-1)[..., :n_k]
    if kpm is not None:
        tok = tok & kpm[:, None, :]
    return tok[:, :, None, :]


def check_case(name, q, k, v, idx, cnt, bm, bn, kpm=None, table=None, n_samples=6, backend="triton", lse=True):
    """Sampled query blocks of one call on ``backend`` vs the fp32 reference (LSE too when ``lse``)."""
    n_q, n_k = q.shape[2], k.shape[2]
    if table is None:
        res = block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, key_padding_mask=kpm,
                                     return_lse=lse, backend=backend)
        out, lse = res if lse else (res, None)
    else:
        t_idx, t_cnt, head_table = table
        out = block_sparse_attention_table(q, k, v, t_idx, t_cnt, head_table, block_m=bm, block_n=bn,
                                           key_padding_mask=kpm, backend=backend)
        lse = None
        ht = head_table.long()
        idx, cnt = t_idx[ht], t_cnt[ht]
    ok = bool(torch.isfinite(out).all())
    M = num_blocks(n_q, bm)
    g = torch.Generator().manual_seed(0)
    picks = sorted({0, M - 1, *torch.randint(0, M, (n_samples,), generator=g).tolist()})
    worst = {"rel": 0.0, "ratio": 0.0, "lse": 0.0}
    checked_rows = 0
    for m in picks:
        r0, r1 = m * bm, min((m + 1) * bm, n_q)
        mask = token_mask_rows(idx, cnt, m, n_k, bm, bn, kpm)  # (B, H, 1, n_k)
        for h in range(q.shape[1]):
            qh, kh, vh, mh = q[:, h : h + 1, r0:r1], k[:, h : h + 1], v[:, h : h + 1], mask[:, h : h + 1]
            s = (qh.float() @ kh.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
            s = s.masked_fill(~mh, float("-inf"))
            empty = torch.isneginf(s.amax(-1, keepdim=True))
            p = torch.softmax(torch.where(empty, torch.zeros_like(s), s), -1).masked_fill(empty, 0.0)
            ref = p @ vh.float()
            checked_rows += int((~empty).sum())
            got = out[:, h : h + 1, r0:r1].float()
            err = (got - ref).abs().max().item()
            rel = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            same = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mh.expand(-1, -1, r1 - r0, -1))
            same = torch.nan_to_num(same.float(), nan=0.0)  # SDPA gives NaN on empty rows; ours gives zeros
            base = (same - ref).abs().max().item()
            worst["rel"] = max(worst["rel"], rel)
            worst["ratio"] = max(worst["ratio"], err / (2 * base + 1e-3))
            if lse is not None:
                ref_lse = torch.logsumexp(s, -1)
                fin = torch.isfinite(ref_lse)
                d = (lse[:, h : h + 1, r0:r1][fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
                worst["lse"] = max(worst["lse"], d)
    ok = ok and checked_rows > 0 and worst["rel"] <= 1e-2 and worst["ratio"] <= 1.0 and worst["lse"] <= 1e-2
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {worst['rel']:.2e}, max err / (2 x same-dtype SDPA err "
          f"+ 1e-3) {worst['ratio']:.2f}, lse err {worst['lse']:.2e} ({checked_rows} non-empty rows checked)")
    return ok


def check_probe(device, dtypes, smoke):
    """The ARM probe kernel (``probe_block_mass``) vs its PyTorch path (fp32 softmax of the same inputs)."""
    from diffusers_attn.kernels import probe_block_mass

    cases = [("probe smoke", 1, 2, 40, 300, 64, 32)] if smoke else [
        ("probe CogVideoX-5B (72 rows)", 1, 48, 72, 17_776, 64, 64),
        ("probe HunyuanVideo 720p (477 rows)", 1, 24, 477, 119_056, 128, 64),
        ("probe CFG batch 2, hd72", 2, 8, 100, 9_000, 72, 64),
    ]
    ok_all = True
    for dtype in dtypes:
        for name, B, H, P, n, D, bn in cases:
            g = torch.Generator().manual_seed(P)
            q = torch.randn(B, H, P, D, generator=g).to(device, dtype)
            k = (torch.randn(B, n, H, D, generator=g) * 2).to(device, dtype).transpose(1, 2)  # strided, as in use
            kpm = torch.ones(B, n, dtype=torch.bool, device=device)
            kpm[:, -min(192, n // 10):] = False
            tw = (torch.rand(n, generator=g) < 0.3).float().to(device)
            got, got_t = probe_block_mass(q, k, block_n=bn, key_padding_mask=kpm, token_weights=tw, backend="triton")
            ref, ref_t = probe_block_mass(q, k, block_n=bn, key_padding_mask=kpm, token_weights=tw, backend="torch")
            fin = bool(torch.isfinite(got).all() and torch.isfinite(got_t).all())
            rel = ((got - ref).norm() / ref.norm()).item()
            rel_t = ((got_t - ref_t).norm() / ref_t.norm()).item()
            rows = (got.sum(-1) - 1).abs().max().item()
            ok = fin and rel <= 1e-3 and rel_t <= 1e-3 and rows <= 1e-3
            ok_all &= ok
            print(f"{'PASS' if ok else 'FAIL'} {name} {dtype}: rel err block mass {rel:.2e}, token mass {rel_t:.2e}, "
                  f"max |row sum - 1| {rows:.2e}")
    return ok_all


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1")
        device, dtypes = torch.device("cpu"), [torch.float16]
        cases = [("smoke hd64", 1, 2, 160, 64, 32, 32), ("smoke hd96", 1, 1, 100, 96, 32, 32)]
        layouts = []
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device (use --smoke under TRITON_INTERPRET=1 to check the script on CPU)")
        device, dtypes = torch.device("cuda"), [torch.bfloat16, torch.float16]
        cases = [
            ("CogVideoX-5B shape", 1, 48, 17_776, 64, 128, 64),
            ("HunyuanVideo 720p shape", 1, 24, 119_056, 128, 128, 64),
            ("CFG batch 2, hd128", 2, 8, 20_000, 128, 128, 64),
            ("Open-Sora hd72 (padded)", 1, 8, 9_000, 72, 128, 64),
            ("hd96 (padded)", 1, 8, 9_000, 96, 128, 64),
            ("odd N, Nq != Nk", 1, 4, 5_001, 64, 128, 64),
        ]
        from diffusers_attn.layout import TokenLayout

        layouts = [("RainFusion plans, CogVideoX-5B", TokenLayout.text_first((13, 30, 45), 226), 48, 64, None),
                   ("RainFusion plans, HunyuanVideo 720p", TokenLayout.video_first((33, 45, 80), 256), 24, 128, 64)]
    all_ok = True
    for dtype in dtypes:
        for name, B, H, n, D, bm, bn in cases:
            g = torch.Generator().manual_seed(n)
            n_k = n + 37 if "Nq != Nk" in name else n
            q = torch.randn(B, H, n, D, generator=g).to(device, dtype)
            k, v = (torch.randn(B, H, n_k, D, generator=g).to(device, dtype) for _ in range(2))
            mask = torch.rand(B, H, num_blocks(n, bm), num_blocks(n_k, bn), generator=g) < 0.25
            mask[..., 0] = True
            idx, cnt = (t.to(device) for t in block_mask_to_lists(mask))
            kpm = torch.ones(B, n_k, dtype=torch.bool, device=device)
            kpm[:, -min(200, n_k // 10) :] = False
            all_ok &= check_case(f"{name} {dtype}", q, k, v, idx, cnt, bm, bn, kpm)
        for name, layout, H, D, valid_text in layouts:
            from diffusers_attn.methods.rainfusion import RainFusionConfig, RainFusionMethod

            plan = RainFusionMethod(RainFusionConfig(sparsity=0.75)).plan(layout)
            t_idx, t_cnt = (t.to(device) for t in plan.pattern_tables())
            g = torch.Generator().manual_seed(1)
            q, k, v = (torch.randn(1, H, layout.seq_len, D, generator=g).to(device, dtype) for _ in range(3))
            head_table = (torch.arange(H, dtype=torch.int32) % 4).view(1, H).to(device)
            kpm = None
            if valid_text is not None:
                kpm = torch.ones(1, layout.seq_len, dtype=torch.bool, device=device)
                kpm[:, layout.text_offset + valid_text :] = False
            all_ok &= check_case(f"{name} {dtype}", q, k, v, None, None, 128, 64, kpm, table=(t_idx, t_cnt,
                                                                                               head_table))
    all_ok &= check_probe(device, dtypes, smoke=args.smoke)
    print("ALL PASS" if all_ok else "SOME CHECKS FAILED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
