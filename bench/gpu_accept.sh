#!/usr/bin/env bash
# Issue 14's measurements as one background job on a 2-GPU machine (bench/gpu_job.sh):
#   lane A (GPU 0): every draft's acceptance table refitted on prompts it never trained on
#           (FIT: the wide drafts on prompts_fit_wide.jsonl, the corpus's held-out prompts), then
#           the one table the issue asks for: every draft in drafts/ with its default GPU tree
#           (--tree auto: its own table and the cost model timed here), greedy and T 0.7, on all
#           development prompts, with and without the outputs that repeat a 20-token sequence,
#           end-to-end tokens/s beside (bench_acceptance.py, all engines compiled at once)
#   lane B (GPU 1): the trees: BEST's fitted trees of 40, 64 and 96 nodes, greedy, compiled and
#           measured the same way (tokens per call and tokens/s; the auto row is lane A's); then
#           the data-size curve's points (spec-train --corpus-tokens, CURVE: new tokens per point)
# The drafts and the corpus travel in the calls' working trees, not all in one (a call carries at
# most 64 MiB): each call copies the drafts/ and corpora/ it holds into the job's copy, and the
# job waits until every draft's weights hash to what its accept.json records (bring them over
# the first calls; move the others' weights aside meanwhile, and restore them before committing).
# Usage: bash bench/gpu_accept.sh start|watch|patch PARTS_DIR [SECONDS]
set -uo pipefail
JOB=accept
. "$(dirname "$0")/gpu_job.sh"
DRAFTS=${DRAFTS:-drafts/smollm2-eagle,drafts/smollm2-eagle-2l,drafts/smollm2-eagle-wide,drafts/smollm2-eagle-wide-eagle3}
BEST=${BEST:-drafts/smollm2-eagle-wide-eagle3}
CURVE=${CURVE:-900000,3000000}

watch() {
  job_wait
  for f in "$LOG"/*.log; do grep -hE "^draft \||\| greedy \||\| 0.7 |rror|complete|stop_reason|wrote" "$f" | tail -14; done 2>/dev/null
  cp "$LOG"/*.json "$OUT/" 2>/dev/null
  tar czf "$OUT/accept_log.tgz" --exclude='./curve_*/run' -C "$LOG" .
}

# drafts_here: every draft of $DRAFTS has arrived whole (its weights hash to its accept.json's)
drafts_here() {
  python3 - "$DRAFTS" <<'PY'
import json, sys
from pathlib import Path
from spec_compiler.tree_choice import draft_weights_sha256
for d in sys.argv[1].split(","):
    try:
        ok = draft_weights_sha256(Path(d)) == json.loads((Path(d) / "accept.json").read_text())["draft_sha256"]
    except Exception:
        ok = False
    if not ok:
        sys.exit(1)
PY
}

# fit DRAFT CPUS GPU: the draft's acceptance table refitted on prompts it never trained on
fit() {
  local d=$1 f=spec_compiler/data/prompts_fit.jsonl
  case "$d" in *wide*) f=spec_compiler/data/prompts_fit_wide.jsonl ;; esac
  run "fit_$(basename "$d")" "$2" "$3" python3 -m spec_compiler.train.fit_tree "$SMOL" "$d" --device cuda \
    --prompts "$f" --n 128 --nodes 96 --out "$LOG/tree96_$(basename "$d").json" --accept-out "$d/accept.json"
  cp "$d/accept.json" "$LOG/accept_$(basename "$d").json"
}
# curve N CPUS GPU: the data-size curve's point at N new tokens of the corpus (EAGLE-1, as the
# 9M point drafts/smollm2-eagle-wide was trained: the same flags and limits)
curve() {
  run "curve_$1" "$2" "$3" env OUT="$LOG/curve_$1" CORPUS="$CORPUS_DIR" CORPUS_TOKENS="$1" EVAL=1 \
    DRAFT="drafts/curve-$1" RUN="runs/curve-$1" bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "${CURVE_S:-570}"
  cp "drafts/curve-$1/training.json" "$LOG/curve_$1.training.json" 2>/dev/null
}

drive() {
  fetch_model 0-15 0 || { say "no model"; touch "$LOG/ALL_DONE"; return; }
  until drafts_here && [ -f "$CORPUS_DIR/index.json" ]; do sleep 5; done
  say "all drafts and the corpus here"
  local -a ds=(${DRAFTS//,/ }) c=(${CURVE//,/ })
  ( for d in "${ds[@]:0:2}"; do fit "$d" 0-15 0; done ) &
  ( for d in "${ds[@]:2}"; do fit "$d" 16-31 1; done ) &
  wait
  ( run table 0-15 0 python3 bench/bench_acceptance.py "$SMOL" --drafts "$DRAFTS" --trees auto --temperatures 0,0.7 \
      --device cuda --jobs 4 --out "$LOG/acceptance_table.json"
    [ -n "${c[0]:-}" ] && curve "${c[0]}" 0-15 0
    say "lane A done" ) &
  ( run trees 16-31 1 python3 bench/bench_acceptance.py "$SMOL" --drafts "$BEST" --trees fitted-40,fitted-64,fitted-96 \
      --device cuda --jobs 3 --out "$LOG/acceptance_trees.json"
    [ -n "${c[1]:-}" ] && curve "${c[1]}" 16-31 1
    say "lane B done" ) &
  wait
  say "all done"
  touch "$LOG/ALL_DONE"
}
CORPUS_DIR=${CORPUS_DIR:-corpora/smollm2-wide}

job_main bench/gpu_accept.sh
