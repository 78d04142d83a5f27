#!/usr/bin/env bash
# Issue 14's measurements as one background job on a 1- or 2-GPU machine (bench/gpu_job.sh):
#   build   every engine at once, on all cores (GPU 0 only for --tree auto's cost model):
#           each draft in drafts/ with its default engine (--tree auto: its own acceptance table
#           and the cost model timed here, measured dispatch, sampling graphs), and BEST's fitted
#           trees of 40, 64 and 96 nodes (greedy only: --no-sampling)
#   measure once every build is done or has timed out (BUILD_S), each engine alone on its GPU (BEST's
#           on GPU 0, the others' on GPU 1 once the curve is done; cores 0-15 / 16-31): all 117
#           development prompts, at most 256 new tokens; greedy and T 0.7 for the default
#           engines, greedy for the trees: tokens per call, with and without the outputs that
#           repeat a 20-token sequence, end-to-end tokens/s
#   curve   meanwhile on GPU 1: the data-size curve's points (spec-train --corpus-tokens N for N
#           in CURVE, EAGLE-1 with the flags and limits the 9M point had), all at once
# The drafts' acceptance tables are the committed ones (fitted on prompts each draft never
# trained on). The drafts and the corpus travel in the calls' working trees, not all in one (a
# call carries at most 64 MiB): each call copies the drafts/ and corpora/ it holds into the
# job's copy, and the job waits until every draft's weights hash to what its accept.json
# records (move the others' weights aside meanwhile; restore them before committing).
# A plan that fits (each call under 64 MiB: the code is ~3.5 MB, a GGUF half 49 MB): the first
# call `start` with the GGUF's first part and drafts/smollm2-eagle-wide's weights, the second
# `watch` with the second part, the third `watch` with the EAGLE-3 draft's weights and the
# corpus; then `watch "" SECONDS` until it is done. (The run of 2026-12-01 also measured the two
# H100 drafts, since removed from drafts/: DRAFTS names them after a checkout from git history.)
# On a machine of one GPU, "GPU 1" below is GPU 0 and both lanes share its cores: the curve and
# MORE train beside the builds, the measurements start once they are done, and the other drafts
# are measured after BEST's engines, one engine at a time.
# Usage: bash bench/gpu_accept.sh start|watch|patch PARTS_DIR [SECONDS]
set -uo pipefail
JOB=accept BRING=1
. "$(dirname "$0")/gpu_job.sh"
DRAFTS=${DRAFTS:-drafts/smollm2-eagle-wide,drafts/smollm2-eagle-wide-eagle3}
BEST=${BEST:-drafts/smollm2-eagle-wide-eagle3}
CURVE=${CURVE-900000,3000000}  # CURVE= (empty): no curve, and the corpus need not come
GPU_TESTS=${GPU_TESTS:-}  # a pytest -k expression: those GPU tests on GPU 1 first (gpu_tests.log)
# MORE=SECONDS (instead of the curve): on GPU 1 and cores 16-31, BEST trained further for that
# long (spec-train --init-from BEST, LR 3e-4 decaying over MORE_TOKENS, default 20M: about what
# 540 s train; EAGLE-3 flags as it was trained with), its
# acceptance table fitted on the held-out prompts there, its default engine built and measured
# (greedy and T 0.7); the draft comes back in more_draft/ (files under 16 MiB)
MORE=${MORE:-}
CORPUS_DIR=${CORPUS_DIR:-corpora/smollm2-wide}
FITTED=${FITTED-40 64 96}  # BEST's fitted trees to build and measure (FITTED= : none)
PROMPTS=${PROMPTS:-spec_compiler/data/prompts_dev.jsonl}  # what every engine is measured on
ENG="$KEEP_ROOT/engines"
# the lanes: GPU 1 and its cores, GPU 0's cores, and all cores
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then G1=1 C0=0-15 C1=16-31 CALL=0-31
else G1=0 C0=0-$(($(nproc) - 1)); C1=$C0 CALL=$C0; fi

watch() {
  job_wait
  grep -hE "^draft \||\| greedy \||\| 0.7 |rror|stop_reason" "$LOG"/*.log 2>/dev/null | tail -24
  [ -f "$LOG/gpu_tests.log" ] && tail -3 "$LOG/gpu_tests.log"
  [ -d "$LOG/more_draft" ] && cp -r "$LOG/more_draft" "$OUT/"
  cp "$LOG"/*.json "$OUT/" 2>/dev/null
  for m in "$ENG"/*/manifest.json; do  # the engines' tree choices and dispatch timings
    [ -f "$m" ] && cp "$m" "$OUT/manifest_$(basename "$(dirname "$m")").json"
  done
  # the logs, each at most 2 MB (a call returns files of at most 16 MiB)
  (cd "$LOG" && find . -type f -size -2M -print0 | tar czf "$OUT/accept_log.tgz" --null -T -)
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

# build NAME DRAFT TREE [FLAGS...]: one engine into $ENG/NAME (cost model on GPU 0)
build() {
  local name=$1 draft=$2 tree=$3; shift 3
  run "build_$name" "$CALL" 0 timeout "${BUILD_S:-900}" python3 -m spec_compiler.cli "$SMOL" --draft "$draft" --out "$ENG/$name" \
    --tree "$tree" --device cuda --max-seq-len 1024 --jobs "${BUILD_JOBS:-4}" "$@"
}
# measure NAME TEMPERATURES GPU CPUS: one built engine alone on its GPU
measure() {
  run "measure_$1" "$4" "$3" python3 bench/bench_acceptance.py "$SMOL" --engine "$ENG/$1" --temperatures "$2" \
    --device cuda --prompts "$PROMPTS" --out "$LOG/acceptance_$1.json"
}
# curve N: the data-size curve's point at N new tokens of the corpus, on GPU 1
curve() {
  run "curve_$1" "$C1" "$G1" env OUT="$LOG/curve_$1" CORPUS="$CORPUS_DIR" CORPUS_TOKENS="$1" EVAL=1 \
    DRAFT="drafts/curve-$1" RUN="runs/curve-$1" bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "${CURVE_S:-570}"
  cp "drafts/curve-$1/training.json" "$LOG/curve_$1.training.json" 2>/dev/null
}

# more: the MORE lane (above), on GPU 1
more() {
  local d="drafts/$(basename "$BEST")-more"
  run more_train "$C1" "$G1" env OUT="$LOG/more" CORPUS="$CORPUS_DIR" ARCH=eagle3 DRAFT_VOCAB=12288 \
    INIT="$BEST" LR=3e-4 TOKENS="${MORE_TOKENS:-20000000}" EVAL=1 DRAFT="$d" RUN=runs/more bash bench/gpu_corpus.sh train "$KEEP_ROOT/gq" "$MORE"
  run more_fit "$C1" "$G1" python3 -m spec_compiler.train.fit_tree "$SMOL" "$d" --device cuda --n 106 \
    --nodes 96 --prompts spec_compiler/data/prompts_fit_wide.jsonl --out "$LOG/more_tree.json" \
    --accept-out "$d/accept.json"
  mkdir -p "$LOG/more_draft" && cp "$d"/*.safetensors "$d"/*.json "$LOG/more_draft/"
  run build_more "$C1" "$G1" timeout "${BUILD_S:-900}" python3 -m spec_compiler.cli "$SMOL" --draft "$d" \
    --out "$ENG/more" --device cuda --max-seq-len 1024 --jobs 4
  measure more 0,0.7 "$G1" "$C1"
}

# wait_pids PID...: until none of these (not this shell's children in a subshell) runs
wait_pids() { for p in "$@"; do while kill -0 "$p" 2>/dev/null; do sleep 5; done; done; }

drive() {
  fetch_model "$C0" 0 || { say "no model"; touch "$LOG/ALL_DONE"; return; }
  [ -n "$GPU_TESTS" ] && run gpu_tests "$C1" "$G1" python3 -m pytest -q -m gpu -k "$GPU_TESTS" tests &
  until drafts_here && { [ -z "$CURVE$MORE" ] || [ -f "$CORPUS_DIR/index.json" ]; }; do sleep 5; done
  say "all drafts here (and the corpus, for the curve or MORE)"
  local -a curves=()
  for n in ${CURVE//,/ }; do curve "$n" & curves+=($!); done
  [ -n "$MORE" ] && { more & curves+=($!); }  # GPU 1's lane: the other drafts are measured after it
  local -a names=() others=() best=()  # the other drafts' engines and build pids; BEST's pids
  # one cost model on GPU 0 at a time: the next starts once it has chosen. BEST gets the default
  # build (measured dispatch); the others the cost model's choice alone (--dispatch predicted: the
  # same tree and graphs at batch 1, without the plain step's graphs to time against them)
  for d in ${DRAFTS//,/ }; do
    local -a how=(); [ "$d" = "$BEST" ] || how=(--dispatch predicted)
    build "$(basename "$d")" "$d" auto "${how[@]}" &
    if [ "$d" = "$BEST" ]; then best+=($!); else others+=($!); names+=("$(basename "$d")"); fi
    for _ in $(seq 60); do grep -q "^\[2/4\]" "$LOG/build_$(basename "$d").log" 2>/dev/null && break; sleep 2; done
  done
  for n in $FITTED; do build "best-fitted-$n" "$BEST" "fitted-$n" --no-sampling & best+=($!); done
  # Measured once every build is done (a compile beside a measurement would skew its tokens/s;
  # BUILD_S bounds a build that stalls), each alone on its GPU: BEST's on GPU 0, the other
  # drafts' on GPU 1 once the curve has freed it.
  wait "${best[@]}" "${others[@]}"
  say "engines built"
  others() { wait_pids "${curves[@]}"; for n in "${names[@]}"; do measure "$n" 0,0.7 "$G1" "$C1"; done; }
  [ "$G1" = 0 ] || others &
  [ "$G1" = 0 ] && wait_pids "${curves[@]}"  # one GPU: nothing trains on it while it is timed
  measure "$(basename "$BEST")" 0,0.7 0 "$C0"
  for n in $FITTED; do measure "best-fitted-$n" 0 0 "$C0"; done
  say "BEST's engines measured"
  [ "$G1" = 0 ] && others  # one GPU: the other drafts after BEST's
  wait
  say "all done"
  touch "$LOG/ALL_DONE"
}

job_main bench/gpu_accept.sh
