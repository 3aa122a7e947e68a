#!/usr/bin/env bash
# The short GPU check (about 8 minutes on an H100): correctness, kernel table, full RainFusion calls, denoising
# steps; every section time-boxed in its own process. Run from the repo root:
#   bash benchmarks/gpu_quick.sh [OUTDIR]        (default: $OUT, else outputs/gpu_quick)
#   bash benchmarks/gpu_quick.sh OUTDIR --dry-run   # CPU, tiny shapes: checks the script only
set -uo pipefail
out=${1:-${OUT:-outputs/gpu_quick}}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec python benchmarks/gpu_quick.py --out "$out" "$@"
