#!/usr/bin/env bash
# Every stage on the GPU, shortened (a smoke run, not a result): pretrain, sft, reward, ppo, dpo,
# eval and sample.py, each on CUDA with bf16 autocast and the Triton kernels, timed. Checkpoints go to OUTDIR.
# Usage (repo root): bash bench/gpu_chain.sh OUTDIR
set -euo pipefail
o=${1:?usage: bash bench/gpu_chain.sh OUTDIR}
mkdir -p "$o"
run() {  # run NAME ARGS...: one stage, its wall time on the last line of its log
  local name=$1; shift
  local t=$SECONDS
  python "$name.py" --device cuda "$@" > "$o/$name.log" 2>&1 || { tail -20 "$o/$name.log"; exit 1; }
  tail -3 "$o/$name.log"
  echo "== $name: $((SECONDS - t)) s"
}
run pretrain --out_dir "$o/base" --max_steps 300
run sft --init "$o/base" --out_dir "$o/sft" --epochs 1
run reward --init "$o/sft" --out_dir "$o/rm" --n_prompts 300 --epochs 1
run ppo --policy "$o/sft" --reward "$o/rm" --out_dir "$o/ppo" --iterations 10
run dpo --init "$o/sft" --out_dir "$o/dpo" --n_prompts 300 --epochs 1
run eval --checkpoints "$o/base,$o/sft,$o/ppo,$o/dpo" --reward "$o/rm" --reference "$o/sft" \
    --n_prompts 100 --best_of 1,4 --out_dir "$o/eval"
run sample --checkpoints "$o/sft,$o/ppo,$o/dpo" --reward "$o/rm" --n_prompts 4 --temperature 1 --n_samples 2 \
    --out "$o/samples.jsonl"
