#!/usr/bin/env bash
# Issue 14's GPU-scale draft training as one background job on a 1-GPU machine that outlives the
# 10-minute calls (bench/gpu_job.sh): the corpus, then training from it, with nothing carried
# between calls while the machine stays warm. `start` (the first call, carrying GGUF part 0: keep it short)
# copies the repository aside, installs it and launches the job; `watch` (each later call: part 1
# on the second) waits. The job runs bench/gpu_corpus.sh's stages:
#   corpus  spec-corpus over the wide training set (27 passes, 256 new tokens: ~9M new tokens,
#           10x the shipped drafts' data), in time-limited runs until index.json says complete
#           (or the corpus runs of this job have taken CORPUS_S seconds)
#   train   spec-train --corpus --resume-if-any for TRAIN_S seconds (the checkpoint resumes
#           on a later job: commit it as docs/training.md says); on a 2-GPU machine an EAGLE-3
#           head trains beside it on GPU 1 (ARCH=eagle3: its draft comes back, its checkpoint,
#           too large to carry, does not)
# What a later session needs comes back as it is ready, at most 7 files and 60 MiB per call (the
# cap on what a call returns: 8 files, 64 MiB), beside the logs ($OUT/draft_log.tgz): the corpus's parts and
# index.json, then the drafts' files, then the checkpoint's parts, each once, named
# KIND__FILE (corpus__, draft__, draft3__ for the EAGLE-3 head, ckpt__). Put them back under the paths gpu_corpus.sh names
# (CORPUS, DRAFT, RUN/checkpoints) and commit the corpus and the draft.
# Usage: bash bench/gpu_draft.sh start|watch|patch PARTS_DIR [SECONDS] | drive
set -uo pipefail
JOB=draft
. "$(dirname "$0")/gpu_job.sh"
CORPUS_S=${CORPUS_S:-900}
TRAIN_S=${TRAIN_S:-780}
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

drive() {
  CORPUS=${CORPUS:-corpora/smollm2-wide}; RUN=${RUN:-runs/smollm2-wide}; DRAFT=${DRAFT:-drafts/smollm2-eagle-wide}
  export CORPUS RUN DRAFT
  if fetch_model 0-15 0; then
    t0=$SECONDS; k=0
    until python3 -c "import json,sys; sys.exit(not json.load(open(sys.argv[1])).get('complete'))" \
        "$CORPUS/index.json" 2>/dev/null || [ $((SECONDS - t0)) -ge "$CORPUS_S" ]; do
      k=$((k + 1))
      run "corpus_$k" 0-15 0 env OUT="$LOG/corpus_out_$k" bash bench/gpu_corpus.sh corpus "$KEEP_ROOT/gq" \
        $((CORPUS_S - (SECONDS - t0))) || break
    done
    stage corpus "$CORPUS"/part-*.bin "$CORPUS/index.json"
    if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then  # a second GPU: an EAGLE-3 head beside
      ( run train3 16-31 1 env OUT="$LOG/train3_out" ARCH=eagle3 DRAFT_VOCAB=12288 DRAFT="$DRAFT-eagle3" \
          RUN="$RUN-eagle3" bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "$TRAIN_S"
        stage draft3 "$DRAFT-eagle3"/*.safetensors "$DRAFT-eagle3"/*.json ) &
    fi
    run train 0-15 0 env OUT="$LOG/train_out" bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "$TRAIN_S"
    stage draft "$DRAFT"/model.safetensors "$DRAFT"/config.json "$DRAFT"/training.json
    stage ckpt "$RUN"/checkpoints/*
    wait
  fi
  say "all done"
  touch "$LOG/ALL_DONE"
}

job_main bench/gpu_draft.sh
