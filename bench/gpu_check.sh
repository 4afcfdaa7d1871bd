#!/usr/bin/env bash
# One call on a GPU machine: validate and time every kernel, time generation and each stage's step,
# then run the whole chain of stages on the GPU, shortened, and time each stage.
# Usage (repo root): bash bench/gpu_check.sh [OUTDIR] [PART...]   -> OUTDIR/*.txt (default: bench/out)
# PART: attention, logprob, speed, chain (default: all four, in that order). Their time limits add up
# to 17.5 minutes: on a 15-minute device budget, run logprob in one call and the other three in another.
set -uo pipefail
out=${1:-bench/out}
shift || true
parts=${*:-attention logprob speed chain}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null; } 2>&1 | tee "$out/env.txt"
for part in $parts; do
  case $part in
    attention) timeout 240 python -m pytest bench/bench_attention.py -s -q 2>&1 | tee "$out/attention.txt" ;;
    logprob) timeout 480 python -m pytest bench/bench_logprob.py -s -q 2>&1 | tee "$out/logprob.txt" ;;
    speed) timeout 180 python -m pytest bench/bench_generation.py bench/bench_train.py -s -q 2>&1 \
             | tee "$out/pipeline_speed.txt" ;;
    chain) timeout 150 bash bench/gpu_chain.sh "$out/chain" 2>&1 | tee "$out/chain.txt" ;;
    *) echo "gpu_check.sh: unknown part '$part' (attention, logprob, speed, chain)"; exit 1 ;;
  esac
done
