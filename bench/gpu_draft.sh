#!/usr/bin/env bash
# Issue 14's GPU-scale draft training as one background job on a 1-GPU machine that outlives the
# 10-minute calls (bench/gpu_job.sh): the corpus, then training from it, with nothing carried
# between calls while the machine stays warm. `start` (the first call, carrying GGUF part 0: keep it short)
# copies the repository aside, installs it and launches the job; `watch` (each later call: part 1
# on the second) waits. The job runs bench/gpu_corpus.sh's stages:
#   corpus  spec-corpus over the wide training set (27 passes, 256 new tokens: ~9M new tokens,
#           10x the shipped drafts' data), in time-limited runs until index.json says complete
#           (or the corpus runs of this job have taken CORPUS_S seconds); a new corpus on a 2-GPU
#           machine is made as two shards at once (one per GPU), then merged
#           (`spec-corpus merge`: the same corpus one run would make, up to the batch both reached)
#   train   spec-train --corpus --resume-if-any for TRAIN_S seconds, then scored on the
#           development prompts (training.json dev_eval; the checkpoint resumes
#           on a later job: commit it as docs/training.md says); on a 2-GPU machine an EAGLE-3
#           head trains beside it on GPU 1 (ARCH=eagle3: its draft comes back, its checkpoint,
#           too large to carry, does not)
# What a later session needs comes back as it is ready, at most 7 files and 60 MiB per call (the
# cap on what a call returns: 8 files, 64 MiB), beside the logs ($OUT/draft_log.tgz): the corpus's parts and
# index.json, then the drafts' files, then the checkpoint's parts, each once, named
# KIND__FILE (corpus__, draft__, draft3__ for the EAGLE-3 head, ckpt__; shard0__ and shard1__ only if the merge failed). Put them back under the paths gpu_corpus.sh names
# (CORPUS, DRAFT, RUN/checkpoints) and commit the corpus and the draft.
# Usage: bash bench/gpu_draft.sh start|watch|patch PARTS_DIR [SECONDS] | drive
set -uo pipefail
JOB=draft
. "$(dirname "$0")/gpu_job.sh"
CORPUS_S=${CORPUS_S:-720}
TRAIN_S=${TRAIN_S:-570}
STAGE_DIR="$LOG/deliver"

# stage KIND FILE...: queue files for delivery, in order (copies: the job may go on writing)
stage() { local kind=$1; shift; mkdir -p "$STAGE_DIR"
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$STAGE_DIR/$(date +%s%N)__${kind}__$(basename "$f")"; done; }
# deliver: the next queued files not yet delivered, within the per-call cap, to $OUT
deliver() {
  local n=0 bytes=0 f size
  touch "$LOG/delivered.txt"
  for f in $(ls "$STAGE_DIR" 2>/dev/null | sort); do
    grep -qxF "$f" "$LOG/delivered.txt" && continue
    size=$(stat -c %s "$STAGE_DIR/$f")
    { [ $n -ge 7 ] || [ $((bytes + size)) -gt $((60 << 20)) ]; } && break
    cp "$STAGE_DIR/$f" "$OUT/${f#*__}" && echo "$f" >> "$LOG/delivered.txt"
    n=$((n + 1)); bytes=$((bytes + size))
  done
  echo "== delivered $n files ($((bytes >> 20)) MiB); $(( $(ls "$STAGE_DIR" 2>/dev/null | wc -l) - $(wc -l < "$LOG/delivered.txt") )) still queued"
}
watch() {
  job_wait
  grep -hE "complete|stop_reason|tokens/s|exit|rror" "$LOG"/*.log 2>/dev/null | tail -12
  deliver
  tar czf "$OUT/draft_log.tgz" --exclude=./deliver --exclude='./corpus_out_*/corpus' \
    --exclude='./train*_out/run' --exclude='./train*_out/draft' -C "$LOG" .
}

# corpus_lane DIR SHARD CPUS GPU: time-limited corpus runs into DIR (SHARD I/N or "" for the
# whole corpus) until its index says complete or CORPUS_S seconds from $t0 have passed
corpus_lane() {
  local dir=$1 shard=$2 k=0
  until python3 -c "import json,sys; sys.exit(not json.load(open(sys.argv[1])).get('complete'))" \
      "$dir/index.json" 2>/dev/null || [ $((SECONDS - t0)) -ge "$CORPUS_S" ]; do
    k=$((k + 1))
    run "corpus${shard:+_${shard%/*}}_$k" "$3" "$4" env OUT="$LOG/corpus_out${shard:+_${shard%/*}}_$k" CORPUS="$dir" \
      SHARD="$shard" bash bench/gpu_corpus.sh corpus "$KEEP_ROOT/gq" $((CORPUS_S - (SECONDS - t0))) || break
  done
}

drive() {
  CORPUS=${CORPUS:-corpora/smollm2-wide}; RUN=${RUN:-runs/smollm2-wide}; DRAFT=${DRAFT:-drafts/smollm2-eagle-wide}
  export CORPUS RUN DRAFT
  if fetch_model 0-15 0; then
    t0=$SECONDS
    two=$([ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] && echo 1)
    if [ -n "$two" ] && [ ! -f "$CORPUS/index.json" ]; then  # a new corpus: one shard per GPU
      corpus_lane "$CORPUS.shard-0" 0/2 0-15 0 & corpus_lane "$CORPUS.shard-1" 1/2 16-31 1 & wait
      run merge 0-15 0 python3 -m spec_compiler.train.corpus merge "$CORPUS.shard-0" "$CORPUS.shard-1" --out "$CORPUS" \
        || for i in 0 1; do stage "shard$i" "$CORPUS.shard-$i"/part-*.bin "$CORPUS.shard-$i/index.json"; done
    else
      corpus_lane "$CORPUS" "" 0-15 0
    fi
    stage corpus "$CORPUS"/part-*.bin "$CORPUS/index.json"
    if [ -n "$two" ]; then  # a second GPU: an EAGLE-3 head beside
      ( run train3 16-31 1 env OUT="$LOG/train3_out" ARCH=eagle3 DRAFT_VOCAB=12288 DRAFT="$DRAFT-eagle3" \
          RUN="$RUN-eagle3" EVAL=1 bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "$TRAIN_S"
        stage draft3 "$DRAFT-eagle3"/*.safetensors "$DRAFT-eagle3"/*.json ) &
    fi
    run train 0-15 0 env OUT="$LOG/train_out" EVAL=1 bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "$TRAIN_S"
    stage draft "$DRAFT"/model.safetensors "$DRAFT"/config.json "$DRAFT"/training.json
    stage ckpt "$RUN"/checkpoints/*
    wait
  fi
  say "all done"
  touch "$LOG/ALL_DONE"
}

job_main bench/gpu_draft.sh
