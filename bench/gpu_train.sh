#!/usr/bin/env bash
# Train the shipped SmolLM2 drafts on one GPU: 1-layer and 2-layer heads side by side, from the
# repository root, so the commands recorded in training.json are the ones to rerun.
# Usage: bash bench/gpu_train.sh PARTS_DIR [SECONDS]   (drafts into drafts/, copies to $OUT)
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
fetch_smollm2 "$1" || exit 1
LIMIT=${2:-420}
COMMON=(--device cuda --tokens 20000000 --time-limit "$LIMIT" --max-new-tokens 256
        --gen-batch 384 --batch-size 16 --reuse 2 --lr 6e-4 --warmup 50 --temperature 0,0.7,1.0
        --draft-vocab 16384 --save-every 200 --log-every 50
        --eval-prompts spec_compiler/data/prompts_dev.jsonl --eval-n 117)
declare -A NAME=([1]=smollm2-eagle [2]=smollm2-eagle-2l)
for L in 1 2; do
  rm -rf "drafts/${NAME[$L]}"
  python3 -m spec_compiler.train.cli "$SMOL" --out "drafts/${NAME[$L]}" --layers $L "${COMMON[@]}" \
    > "$OUT/train_$L.log" 2>&1 &
done
wait
mkdir -p "$KEEP"
for L in 1 2; do
  tail -4 "$OUT/train_$L.log"
  rm -rf "drafts/${NAME[$L]}/checkpoints"
  cp -r "drafts/${NAME[$L]}" "$KEEP/"
  mkdir -p "$OUT/d$L" && cp drafts/${NAME[$L]}/{model.safetensors,config.json,training.json} "$OUT/d$L/"
done
nvidia-smi --query-gpu=name --format=csv,noheader
