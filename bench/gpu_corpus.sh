#!/usr/bin/env bash
# GPU-scale draft training (docs/training.md, "Corpus and GPU-scale training") in calls of at most
# 10 minutes. Every stage is one call; any call may land on a fresh machine, so everything a
# later call needs comes back under $OUT and is committed before the next call:
#   corpus: spec-corpus continues the wide training set (27 passes: one greedy, then T 0.7 and 1.0
#           in turn, 256 new tokens: ~9M new tokens, 10x the shipped drafts' data) for $LIMIT seconds; CORPUS comes back (parts <= 15 MiB). Repeat until
#           index.json says complete (the stage prints it). SHARD=I/N makes shard I of N instead
#           (one per GPU, each its own CORPUS; `spec-corpus merge` joins them).
#   train:  spec-train --corpus, resumed from the checkpoint in $RUN if there is one, for $LIMIT
#           seconds; the checkpoint (parts <= 15 MiB) and the draft come back. Repeat until the
#           printed stop_reason is "tokens" or "early stop".
#   report: the finished draft scored on the development prompts (training.json dev_eval).
#   trees:  the finished draft's acceptance table refitted on the GPU, fitted trees of 40, 64 and
#           96 nodes compiled and measured one after another (tokens per call and seconds on the
#           dev prompts), and the --tree auto engine's choice among all sizes (bench_acceptance).
# Usage: bash bench/gpu_corpus.sh STAGE PARTS_DIR [LIMIT_SECONDS]
#   the SmolLM2 GGUF parts as for bench/gpu_round.sh (kept in $KEEP_ROOT while the machine is warm)
set -uo pipefail
STAGE=${1:?usage: gpu_corpus.sh corpus|train|report|trees PARTS_DIR [LIMIT_SECONDS]}
PARTS=${2:?usage: gpu_corpus.sh STAGE PARTS_DIR [LIMIT_SECONDS]}
LIMIT=${3:-480}
. "$(dirname "$0")/gpu_env.sh"
KEEP_ROOT=${KEEP_ROOT:-$HOME/keep}
mkdir -p "$KEEP_ROOT/gq" && cp "$PARTS"/gq_0* "$KEEP_ROOT/gq/" 2>/dev/null
[ "$(ls "$KEEP_ROOT/gq" | wc -l)" -ge 2 ] || { echo "GGUF part kept; the next call brings the other"; exit 0; }
fetch_smollm2 "$KEEP_ROOT/gq" || exit 1
CORPUS=${CORPUS:-corpora/smollm2-wide}
RUN=${RUN:-runs/smollm2-wide}
DRAFT=${DRAFT:-drafts/smollm2-eagle-wide}
# ARCH=eagle3 trains an EAGLE-3 head instead (its own lm_head over DRAFT_VOCAB hot tokens: 12288
# keeps that tensor, and so each shard of the draft, under 15 MiB; its checkpoint, ~14 bytes per
# trainable parameter, is too large to carry between machines: train it within one warm job)
ARCH=${ARCH:-eagle}; DRAFT_VOCAB=${DRAFT_VOCAB:-16384}
TRAIN=(python3 -m spec_compiler.train.cli "$SMOL" --out "$DRAFT" --corpus "$CORPUS" --device cuda
       --checkpoint-dir "$RUN/checkpoints" --keep-checkpoints 1 --tokens "${TOKENS:-40000000}" --batch-size 16
       --gen-batch 384 --reuse 2 --lr 6e-4 --warmup 50 --draft-vocab "$DRAFT_VOCAB" --arch "$ARCH" --val-every 200
       --patience 5 --save-every 200 --log-every 50 --resume-if-any)
# A data-size point: CORPUS_TOKENS=N trains on the corpus's first N new tokens (nested subsets;
# give each point its own DRAFT and RUN), then bench/training_curve.py tabulates and plots them.
[ -n "${CORPUS_TOKENS:-}" ] && TRAIN+=(--corpus-tokens "$CORPUS_TOKENS")
# INIT=DRAFT_DIR: start from that finished draft (spec-train --init-from; a fresh optimizer and
# schedule); LR: the peak learning rate (default 6e-4); TOKENS: the token budget the learning rate
# decays over (default 40M; one that fits the time limit lets the schedule finish)
[ -n "${INIT:-}" ] && TRAIN+=(--init-from "$INIT")
[ -n "${LR:-}" ] && TRAIN+=(--lr "$LR")
# EVAL=1: the train stage also scores the draft on the development prompts when it stops (the
# report stage's dev_eval; reporting only, never a stopping rule)
DEV=(--eval-prompts spec_compiler/data/prompts_dev.jsonl --eval-n 117)
[ -n "${EVAL:-}" ] && TRAIN+=("${DEV[@]}")
case "$STAGE" in
corpus)
  python3 -m spec_compiler.train.corpus "$SMOL" --out "$CORPUS" --device cuda --passes 27 \
    --temperature 0,0.7,1.0 --max-new-tokens 256 --gen-batch 1024 --time-limit "$LIMIT" \
    ${SHARD:+--shard "$SHARD"} 2>&1 \
    | tee "$OUT/corpus.log" | tail -6
  python3 -c "import json,sys; i=json.load(open(sys.argv[1])); print('complete', i.get('complete'), i['totals'])" \
    "$CORPUS/index.json"
  mkdir -p "$OUT/corpus" && cp "$CORPUS"/index.json "$CORPUS"/part-*.bin "$OUT/corpus/"
  ;;
train|report)
  [ "$STAGE" = report ] && [ -z "${EVAL:-}" ] && TRAIN+=("${DEV[@]}")
  "${TRAIN[@]}" --time-limit "$LIMIT" > "$OUT/train.log" 2>&1
  echo "exit $?"; grep -v "^\s*$" "$OUT/train.log" | tail -8
  python3 -c "import json,sys; t=json.load(open(sys.argv[1])); v=t.get('validation', {}); \
print('stop_reason', t.get('stop_reason'), '| tokens', t['final_metrics']['tokens_seen'], \
'| corpus tokens used', t['final_metrics'].get('corpus_tokens_used'), '| best val', v.get('best'), \
'| dev', t.get('dev_eval'))" "$DRAFT/training.json"
  mkdir -p "$OUT/run" "$OUT/draft" && cp -r "$RUN"/. "$OUT/run/" \
    && cp "$DRAFT"/*.safetensors "$DRAFT"/*.json "$OUT/draft/"
  ;;
trees)
  # FIT_PROMPTS: prompts the draft never trained on (a wide-corpus draft: prompts_fit_wide.jsonl,
  # the corpus's held-out prompts; the packaged prompts_fit.jsonl is part of the wide set)
  python3 -m spec_compiler.train.fit_tree "$SMOL" "$DRAFT" --device cuda --n 128 --nodes 96 \
    --prompts "${FIT_PROMPTS:-spec_compiler/data/prompts_fit_wide.jsonl}" \
    --out "$OUT/tree-96.json" --accept-out "$DRAFT/accept.json" 2>&1 | tail -2
  T="auto,fitted-40,fitted-64,fitted-96"  # spec-compile --tree fitted-N: the table's own trees
  timeout 560 python3 bench/bench_acceptance.py "$SMOL" --drafts "$DRAFT" --trees "$T" --device cuda \
    --jobs 1 --out "$OUT/acceptance_trees.json" > "$OUT/acceptance_trees.log" 2>&1
  grep -v "^\[\|DEBUG\|^W1\|^I1" "$OUT/acceptance_trees.log" | tail -8
  cp "$DRAFT/accept.json" "$OUT/"
  ;;
*) echo "unknown stage $STAGE: corpus, train, report or trees"; exit 2 ;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader
