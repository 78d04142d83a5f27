#!/usr/bin/env bash
# The open GPU work on one warm 2-GPU machine, in back-to-back calls of at most 10 minutes. Two
# lanes run side by side: lane A on GPU 0 and CPU cores 0-15 (what is timed), lane B on GPU 1
# and cores 16-31 (tests and engine builds); timings that need both GPUs run alone. Everything
# a later call needs stays in $KEEP_ROOT (it outlives the calls while the machine is warm). Logs
# and JSON come back as one archive, $OUT/stageN.tgz (a call returns at most 8 files).
#   stage 1: on B, two GPU tests of engines lowered by the parallel workers; with TESTS=1
#            the GPU tests of TP world-size-1 NCCL and of the tree cost
#            model's CUDA-graph timing (both passed on 2026-11-30; all of test_gpu_runtime too
#            with RUNTIME=1), then bench_batch's 8B plain and forced engines; on A, its 8B
#            dispatcher engine (whole: its compile time is the one reported; A chooses the
#            trees, B builds from that choice). An 8B engine of 7 buckets takes longer than one
#            call: what a call lowered stays in the lowered-graph cache (~/.cache, kept while the
#            machine is warm), so the next stage's builds resume from it
#   stage 2: the 8B curves: ours on A from stage 1's engines (any left unbuilt resume from
#            the graph cache), transformers' on B
#   stage 2p: bench_pair on A (T = 0, 0.7, 1.0 vs transformers; `--tree auto` chosen by
#            CUDA-graph timing)
#   stage 3: our pair curves then spec-serve (the pair's --max-batch 64 engine) on A;
#            transformers' pair curve then its server on B (`transformers serve`, its packages
#            carried in .whl-serve, else in-process continuous batching); one table and plot of
#            every curve (stage 2's 8B ones too) and one serving table
#   stage 4: the 8B TP 2 engines with the replicated (A) and the vocabulary-sharded (B) lm_head
#            built (each lane's decode and speculative engines at once), then bench_tp compares
#            them on both GPUs (alone; needs no SmolLM2 part), then the 2-GPU TP test of both
#            layouts
#   stage 5: the pair's batch curves alone, in one call (its dispatcher engine and curve on A;
#            its plain and forced engines on B, then transformers' curve there; A times those two
#            once B built them), one table and plot
# (The 2026-11-30 runs used earlier versions of this script: the first for the sampling and TP
# numbers; the second's serving numbers came from an earlier stage 5, since folded into stage
# 3, that built a --max-batch 16 engine on 24 cores and served it beside the peer; the third's
# pair curves from this stage 5, before measured dispatch, and its TP numbers from stage 4.)
# Stage 3 uses the pair engines that stage 5 builds. Stages 1, 2 and 5 are superseded by
# bench/gpu_session.sh, which runs their work as one background job across calls.
# Usage: bash bench/gpu_x2.sh STAGE PARTS_DIR [SECONDS]   (SECONDS: this call's budget, 560)
set -uo pipefail
STAGE=${1:?usage: gpu_x2.sh STAGE PARTS_DIR [SECONDS]}
PARTS=${2:?usage: gpu_x2.sh STAGE PARTS_DIR [SECONDS]}
BUDGET=${3:-560}
. "$(dirname "$0")/gpu_env.sh"
KEEP_ROOT=${KEEP_ROOT:-$HOME/keep}
LOG="$OUT/w"; mkdir -p "$LOG" "$KEEP_ROOT/gq"
cp "$PARTS"/gq_0* "$KEEP_ROOT/gq/" 2>/dev/null
left() { echo $((BUDGET - SECONDS - ${1:-0})); }  # seconds left in this call, less a margin
PIN_A=(taskset -c 0-15); PIN_B=(taskset -c 16-31)
command -v taskset >/dev/null || { PIN_A=(); PIN_B=(); }
# A/B/T SECONDS CMD...: CMD on lane A, lane B or the whole machine, stopped after SECONDS (and
# killed 10 s later: a test's rank processes can outlive a TERM); run only with > 10 s left
T() { local s=$1; shift; [ "$s" -gt 10 ] || return 124; timeout -k 10 "$s" "$@"; }
A() { local s=$1; shift; CUDA_VISIBLE_DEVICES=0 T "$s" "${PIN_A[@]}" "$@"; }
B() { local s=$1; shift; CUDA_VISIBLE_DEVICES=1 T "$s" "${PIN_B[@]}" "$@"; }
PYTEST=(python3 -m pytest -v -p no:cacheprovider -rfE)  # -v: each outcome logged as it comes
BATCH=(python3 bench/bench_batch.py --device cuda --engines "$KEEP_ROOT/batch" --model "$SMOL")
outcomes() { for f in "$@"; do echo "-- $f: $(grep -c PASSED "$LOG/$f.log" 2>/dev/null) passed"
  grep -E "FAILED|ERROR|passed|failed" "$LOG/$f.log" 2>/dev/null | tail -4; done; }
finish() {
  echo "== stage $STAGE done at ${SECONDS}s"
  tar czf "$OUT/stage$STAGE.tgz" -C "$LOG" . && rm -rf "$LOG"
}
echo "== stage $STAGE: $(nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd,)"
case "$STAGE" in
1)
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  (
    # first, engines lowered by the parallel workers (weights sharing one buffer since
    # 2026-11-30) must still equal transformers and be batch-invariant on the GPU
    B 240 "${PYTEST[@]}" tests/test_gpu_runtime.py -m gpu \
      -k "test_cuda_engine_matches_transformers or test_batched_cuda_greedy_equals_solo" \
      > "$LOG/t_workers.log" 2>&1; echo "worker-lowered engine tests rc $? at ${SECONDS}s"
    [ -n "${TESTS:-}" ] && { B 150 "${PYTEST[@]}" tests/test_tp.py tests/test_tree_choice.py -m "gpu and not multi_gpu" \
      > "$LOG/t_gpu.log" 2>&1; echo "GPU tests rc $? at ${SECONDS}s"; }
    [ -n "${RUNTIME:-}" ] && { B 360 "${PYTEST[@]}" tests/test_gpu_runtime.py -m gpu > "$LOG/t_runtime.log" 2>&1
                               echo "runtime tests rc $? at ${SECONDS}s"; }
    # the forced engine builds from A's tree choice: wait for it (A writes it before compiling)
    until [ -f "$KEEP_ROOT/batch/llama8b-cuda.trees.json" ] || [ "$(left 200)" -lt 0 ]; do sleep 5; done
    B "$(left 40)" "${BATCH[@]}" --shapes llama8b --build-only --only ours_plain,ours_forced \
      > "$LOG/batch_build_8b_b.log" 2>&1
    echo "8B batch build (B) rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  A "$(left 40)" "${BATCH[@]}" --shapes llama8b --build-only --only ours_dispatch > "$LOG/batch_build_8b_a.log" 2>&1
  echo "8B batch build (A) rc $? at ${SECONDS}s"
  wait $LANE_B
  outcomes t_workers t_gpu t_runtime
  grep -hE "built|chosen|rror" "$LOG"/batch_build_8b_*.log | tail -8
  ;;
2)  # the 8B curves (stage 1's engines; any it left unbuilt resume from the graph cache)
  (
    B "$(left 20)" "${BATCH[@]}" --shapes llama8b --curves hf --out "$LOG/batch_8b_hf.json" > "$LOG/batch_8b_hf.log" 2>&1
    echo "bench_batch llama8b hf rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  A "$(left 20)" "${BATCH[@]}" --shapes llama8b --curves ours_dispatch,ours_plain,ours_forced \
    --out "$LOG/batch_8b.json" > "$LOG/batch_8b.log" 2>&1
  echo "bench_batch llama8b ours rc $? at ${SECONDS}s"
  wait $LANE_B
  grep -hE "built|rror|dispatch\]" "$LOG"/batch_8b*.log | tail -12
  python3 bench/bench_batch.py --merge "$(ls "$LOG"/batch_8b.json "$LOG"/batch_8b_hf.json 2>/dev/null | paste -sd,)" \
    --out "$LOG/batch_8b_all.json" 2>&1 | tail -12
  ;;
2p)  # bench_pair on one GPU (T = 0, 0.7, 1.0 vs transformers; `--tree auto` by CUDA-graph timing)
  fetch_smollm2 "$KEEP_ROOT/gq" > "$LOG/fetch.log" 2>&1 || { tail -5 "$LOG/fetch.log"; finish; exit 1; }
  A "$(left 30)" python3 bench/bench_pair.py --model "$SMOL" --device cuda --engines "$KEEP_ROOT/eng" \
    --temperatures 0,0.7,1.0 --top-p 0.9 --hf-eager none --out "$LOG/pair_cuda.json" > "$LOG/pair_cuda.log" 2>&1
  echo "bench_pair rc $? at ${SECONDS}s"
  grep -v "^\[\|^  \|^T=" "$LOG/pair_cuda.log" | tail -24
  ;;
3)
  fetch_smollm2 "$KEEP_ROOT/gq" > "$LOG/fetch.log" 2>&1 || { tail -5 "$LOG/fetch.log"; finish; exit 1; }
  # The peer at its best: `transformers serve` (its fastapi/uvicorn/openai/pydantic travel as
  # wheels in .whl-serve, carried by the call); transformers' in-process continuous batching if
  # they do not import
  PEER=cb
  if ls .whl-serve/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/serve-site \
      .whl-serve/*.whl >/dev/null 2>&1 && PYTHONPATH=/tmp/serve-site python3 -c "import fastapi, uvicorn, openai, pydantic"; then
    PEER=serve
  fi
  echo "serving peer: $PEER"
  SERVE=(python3 bench/bench_serve.py --model "$SMOL" --rates 1,4,16,inf --n 64)
  (  # the peers on B: transformers' batched generation for the pair, then its server
    B "$(left 150)" "${BATCH[@]}" --shapes pair --curves hf --out "$LOG/batch_pair_hf.json" > "$LOG/batch_pair_hf.log" 2>&1
    echo "bench_batch pair hf rc $? at ${SECONDS}s"
    [ "$PEER" = serve ] && export PYTHONPATH=/tmp/serve-site${PYTHONPATH:+:$PYTHONPATH}
    B "$(left 15)" "${SERVE[@]}" --servers peer --peer "$PEER" --out "$LOG/serve_peer.json" \
      > "$LOG/serve_peer.log" 2>&1
    echo "bench_serve peer rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  # ours on A: the pair's curves, then spec-serve over the pair's --max-batch 64 dispatcher engine
  A "$(left 150)" "${BATCH[@]}" --shapes pair --curves ours_dispatch,ours_plain,ours_forced \
    --out "$LOG/batch_pair.json" > "$LOG/batch_pair.log" 2>&1
  echo "bench_batch pair ours rc $? at ${SECONDS}s"
  A "$(left 15)" "${SERVE[@]}" --engine "$KEEP_ROOT/batch/pair-ours_dispatch-cuda" --servers ours \
    --out "$LOG/serve_ours.json" > "$LOG/serve_ours.log" 2>&1
  echo "bench_serve ours rc $? at ${SECONDS}s"
  wait $LANE_B
  python3 bench/bench_batch.py --merge "$(ls "$LOG"/batch_pair.json "$LOG"/batch_pair_hf.json \
    "$KEEP_ROOT"/batch_8b.json "$KEEP_ROOT"/batch_8b_hf.json 2>/dev/null | paste -sd,)" \
    --out "$LOG/batch_cuda.json" 2>&1 | tail -22
  python3 bench/bench_serve.py --merge "$(ls "$LOG"/serve_ours.json "$LOG"/serve_peer.json 2>/dev/null | paste -sd,)" \
    --out "$LOG/serve_cuda.json" 2>&1 | tail -12
  ;;
4)
  TP=(python3 bench/bench_tp.py --shape llama8b --tp 2 --engines "$KEEP_ROOT/tp")
  # each lane builds its layout's two engines at once, in two processes (the decode engine's one
  # graph, the speculative engine's two: about 200 s); what a stopped call had lowered stays in
  # the graph cache, and the next call resumes from it
  for k in decode spec; do
    A "$(left 220)" "${TP[@]}" --lm-head replicated --build-only --only $k > "$LOG/tp_build_a_$k.log" 2>&1 &
    B "$(left 220)" "${TP[@]}" --lm-head vocab --build-only --only $k > "$LOG/tp_build_b_$k.log" 2>&1 &
  done
  # beside them (the builds leave cores idle): where one 8B verify graph's lowering time goes
  A "$(left 220)" python3 bench/profile_lowering.py --shape llama8b --graph verify --tree fitted-16 \
    --out "$LOG/profile_8b.json" > "$LOG/profile_8b.log" 2>&1 &
  wait; grep -hE "built|rror" "$LOG"/tp_build_*.log | tail -8
  grep -A12 "s wall" "$LOG/profile_8b.log" | head -14
  T "$(left 110)" "${TP[@]}" --lm-head replicated,vocab --out "$LOG/tp_cuda.json" > "$LOG/tp.log" 2>&1
  echo "bench_tp rc $? at ${SECONDS}s"; tail -6 "$LOG/tp.log"
  T "$(left 10)" "${PYTEST[@]}" tests/test_tp.py -m multi_gpu > "$LOG/t_tp2.log" 2>&1  # both layouts on 2 GPUs
  outcomes t_tp2
  ;;
5)  # the real pair's batch curves in one call: its three engines built on both lanes, then timed
  fetch_smollm2 "$KEEP_ROOT/gq" > "$LOG/fetch.log" 2>&1 || { tail -5 "$LOG/fetch.log"; finish; exit 1; }
  PAIR=("${BATCH[@]}" --shapes pair)
  rm -f "$KEEP_ROOT/pair_b_built"
  (  # B: the plain engine, then the forced one (the dispatcher's batch-1 tree, read from A's log
     # as soon as A has chosen it), then transformers' curve
    B "$(left 300)" "${PAIR[@]}" --build-only --only ours_plain > "$LOG/pair_build_plain.log" 2>&1
    echo "pair plain build (B) rc $? at ${SECONDS}s"
    N=
    until N=$(sed -n 's/.*batch 1: fitted-\([0-9]*\).*/\1/p' "$LOG/pair_dispatch.log" 2>/dev/null | head -1)
          [ -n "$N" ] || grep -q "batch 1: chain-" "$LOG/pair_dispatch.log" 2>/dev/null || [ "$(left 250)" -lt 0 ]; do
      sleep 3; done
    if [ -n "$N" ]; then echo "forced tree: fitted-$N"; else echo "forced tree: the dispatcher engine's batch-1 tree"; fi
    B "$(left 90)" "${PAIR[@]}" --build-only --only ours_forced ${N:+--forced-tree "$N"} > "$LOG/pair_build_forced.log" 2>&1
    echo "pair forced build (B) rc $? at ${SECONDS}s"
    touch "$KEEP_ROOT/pair_b_built"
    B "$(left 15)" "${PAIR[@]}" --curves hf --out "$LOG/batch_pair_hf.json" > "$LOG/batch_pair_hf.log" 2>&1
    echo "bench_batch pair hf rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  # A: the dispatcher engine (its compile time is the one reported) and its curve, then the other
  # two curves once B has built their engines
  A "$(left 120)" "${PAIR[@]}" --curves ours_dispatch --out "$LOG/batch_pair_dispatch.json" > "$LOG/pair_dispatch.log" 2>&1
  echo "bench_batch pair dispatch rc $? at ${SECONDS}s"
  until [ -f "$KEEP_ROOT/pair_b_built" ] || [ "$(left 60)" -lt 0 ]; do sleep 3; done
  A "$(left 15)" "${PAIR[@]}" --curves ours_plain,ours_forced --out "$LOG/batch_pair_pf.json" > "$LOG/batch_pair_pf.log" 2>&1
  echo "bench_batch pair plain+forced rc $? at ${SECONDS}s"
  wait $LANE_B
  grep -hE "built|rror|chosen|\[tree\]" "$LOG"/pair_*.log | tail -14
  python3 bench/bench_batch.py --merge "$(ls "$LOG"/batch_pair_*.json 2>/dev/null | paste -sd,)" \
    --out "$LOG/batch_pair_cuda.json" 2>&1 | tail -16
  ;;
*) echo "unknown stage $STAGE: 1, 2, 2p, 3, 4 or 5"; exit 2 ;;
esac
finish
