"""``diffusers-attn eval ...`` subcommands (sampling, fidelity, VBench)."""

from __future__ import annotations

import argparse


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluation: sample a prompt suite, paired fidelity, VBench")
    p.add_subparsers(dest="eval_command", required=True)
