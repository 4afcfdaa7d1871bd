#!/usr/bin/env bash
# One call on a GPU machine: validate and time every kernel, then time generation and each stage's step.
# Usage (repo root): bash bench/gpu_check.sh [OUTDIR]   -> OUTDIR/*.txt (default: bench/out)
set -uo pipefail
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$out/env.txt"
timeout 240 python -m pytest bench/bench_attention.py -s -q 2>&1 | tee "$out/attention.txt"
timeout 240 python -m pytest bench/bench_logprob.py -s -q 2>&1 | tee "$out/logprob.txt"
timeout 240 python -m pytest bench/bench_generation.py bench/bench_train.py -s -q 2>&1 | tee "$out/pipeline_speed.txt"
