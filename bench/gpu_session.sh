#!/usr/bin/env bash
# Issue 12's GPU numbers in one session on a 2-GPU machine, as one background job that outlives
# the 10-minute calls (started with setsid, it runs on while the machine is held): `start` (the
# first call: keep it short) copies the repository aside, installs it from there and launches the
# job; `watch` (each later call) hands it the next SmolLM2 GGUF part and waits; `patch` also
# brings a fix. Every call returns the logs and JSON so far as $OUT/session.tgz. Nothing is cut at
# a call's end, so no engine build is lost between calls, and each lane starts its next step as
# soon as what it needs exists.
#   lane A (GPU 0): the runtime's GPU tests (those of admission first: the newest code)
#   lane B (GPU 1): once SmolLM2 has arrived, the pair's dispatcher engine with its plain and
#     forced engines built beside it; the pair's curves (both schedules: waves and continuous)
#     and, with HF_PAIR=1, transformers' pair curve (static-cache generate); then the 8B-shape
#     dispatcher engine (whole, --max-batch 64, its draft's lm_head over bench_decode's 32k hot
#     tokens: its compile time is the one reported), its curve and the forced curve from the
#     speculative steps its measured dispatch timed; with PLAIN_8B=1, the 8B plain (chain-0)
#     engine and its curve
# CPU cores are split so that what is timed never shares cores with a compile.
# Usage: bash bench/gpu_session.sh start|watch|patch PARTS_DIR [SECONDS] | drive
set -uo pipefail
JOB=batch
. "$(dirname "$0")/gpu_job.sh"
ENG="$KEEP_ROOT/batch"

# built NAME: wait until engine NAME's build has ended; true if it succeeded
built() { until [ -e "$LOG/$1.built" ] || [ -e "$LOG/$1.failed" ]; do sleep 5; done; [ -e "$LOG/$1.built" ]; }
# build NAME CPUS CMD...: a build on GPU 1 that leaves NAME.built or NAME.failed
build() { local name=$1 cpus=$2; shift 2
  if run "b_$name" "$cpus" 1 "$@"; then touch "$LOG/$name.built"; else touch "$LOG/$name.failed"; fi; }

watch() {
  job_wait
  grep -hE "built|rror|\[dispatch\]" "$LOG"/*.log 2>/dev/null | grep -v "^\[" | tail -20
  tar czf "$OUT/session.tgz" -C "$LOG" .
}

drive() {
  BATCH=(python3 bench/bench_batch.py --device cuda --engines "$ENG" --model "$SMOL")
  PAIR=("${BATCH[@]}" --shapes pair)
  B8=("${BATCH[@]}" --shapes llama8b)
  TESTS=(python3 -m pytest -v -p no:cacheprovider -rfE --durations=15 tests/test_gpu_runtime.py -m gpu)
  (  # lane A
    run t_new 0-9 0 timeout -k 10 900 "${TESTS[@]}" -k "admission"
    run t_rest 0-9 0 timeout -k 10 1200 "${TESTS[@]}" -k "not per-bucket and not admission"
    touch "$LOG/lane_a.done"
  ) &
  (  # lane B
    if ! fetch_model 10-31 1; then
      touch "$LOG"/pair_{dispatch,plain,forced}.failed
    else
      build pair_dispatch 10-17 "${PAIR[@]}" --build-only --only ours_dispatch &
      build pair_plain 18-24 "${PAIR[@]}" --build-only --only ours_plain &
      N=  # the forced engine's tree: the dispatcher's batch-1 tree, read from its log once chosen
      until N=$(sed -n 's/.*batch 1: fitted-\([0-9]*\).*/\1/p' "$LOG/b_pair_dispatch.log" 2>/dev/null | head -1)
            [ -n "$N" ] || grep -q "batch 1: chain-" "$LOG/b_pair_dispatch.log" 2>/dev/null \
            || [ -e "$LOG/pair_dispatch.failed" ]; do sleep 3; done
      say "forced tree: $([ -n "$N" ] && echo "fitted-$N" || echo "none chosen: chain-3 or the built dispatcher's")"
      build pair_forced 25-31 "${PAIR[@]}" --build-only --only ours_forced ${N:+--forced-tree "$N"}
    fi
    wait  # the pair's builds
    # timed on GPU 1 and cores 10-21, while lane A compiles on cores 0-9 for GPU 0
    built pair_dispatch && run c_pair_dispatch 10-21 1 "${PAIR[@]}" --curves ours_dispatch \
      --out "$LOG/batch_pair_b1.json"
    built pair_plain && built pair_forced && run c_pair_pf 10-21 1 "${PAIR[@]}" --curves ours_plain,ours_forced \
      --out "$LOG/batch_pair_b2.json"
    if [ -n "${HF_PAIR:-}" ]; then  # transformers' static-cache generate (its generate_batch: 10-18 tokens/s)
      run b_pair_hf 10-21 1 "${PAIR[@]}" --curves hf --hf-methods static --out "$LOG/batch_pair_hf.json"
    fi
    run b_8b_build 10-21 1 "${B8[@]}" --build-only --only ours_dispatch
    run b_8b_curve 10-21 1 "${B8[@]}" --curves ours_dispatch,ours_forced --forced-from-dispatch \
      --out "$LOG/batch_8b_a.json"
    if [ -n "${PLAIN_8B:-}" ]; then
      run b_8b_plain_build 10-31 1 "${B8[@]}" --build-only --only ours_plain
      run b_8b_plain_curve 10-21 1 "${B8[@]}" --curves ours_plain --out "$LOG/batch_8b_b.json"
    fi
    touch "$LOG/lane_b.done"
  ) &
  wait
  python3 bench/bench_batch.py --merge "$(ls "$LOG"/batch_8b_*.json | paste -sd,)" \
    --out "$LOG/batch_8b_h200.json" > "$LOG/merge_8b.log" 2>&1
  python3 bench/bench_batch.py --merge "$(ls "$LOG"/batch_pair_*.json | paste -sd,)" \
    --out "$LOG/batch_pair_h200.json" > "$LOG/merge_pair.log" 2>&1
  say "all done"
  touch "$LOG/ALL_DONE"
}

job_main bench/gpu_session.sh
