#!/usr/bin/env bash
# Every GPU check and benchmark of the block-sparse kernel work, one command (run from the repo root):
#   bash benchmarks/gpu_all.sh [OUTDIR]
# Correctness first (exits non-zero if the kernel fails its checks), then the timing scripts. Each part also
# runs alone; on a time-limited machine run the parts as separate commands (step_e2e alone takes minutes).
set -euo pipefail
out=${1:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python - <<'PY' | tee "$out/env.txt"
import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__, torch.cuda.get_device_name())
PY
python benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
python benchmarks/attention_kernels.py --json "$out/attention_kernels.json" 2>&1 | tee "$out/attention_kernels.txt"
python benchmarks/rainfusion_attention.py --json "$out/rainfusion_attention.json" 2>&1 | tee "$out/rainfusion_attention.txt"
python benchmarks/step_e2e.py --json "$out/step_e2e.json" 2>&1 | tee "$out/step_e2e.txt"
python benchmarks/step_e2e.py --models wan2.1-14b-720p --json "$out/step_e2e_wan.json" 2>&1 | tee "$out/step_e2e_wan.txt"
python benchmarks/step_e2e.py --models opensora-256px opensora-768px --json "$out/step_e2e_opensora.json" 2>&1 | tee "$out/step_e2e_opensora.txt"
python benchmarks/step_e2e.py --models hunyuanvideo-1.5-720p --json "$out/step_e2e_hv15.json" 2>&1 | tee "$out/step_e2e_hv15.txt"
# FEAT (issue 8): Bi-WKV kernel correctness, then kernel / attention-call / step timings
python benchmarks/feat_gpu_check.py 2>&1 | tee "$out/feat_gpu_check.txt"
python benchmarks/feat.py --json "$out/feat.json" 2>&1 | tee "$out/feat.txt"
