#!/usr/bin/env bash
# The open GPU work of the sampling, batching, serving and tensor-parallel issues on one warm
# 2-GPU machine, in three back-to-back calls of at most 10 minutes. Two lanes run side by side:
# lane A on GPU 0 and CPU cores 0-15 (what is timed), lane B on GPU 1 and cores 16-31 (tests and
# engine builds); timings that need both GPUs run alone. Everything a later call needs stays in
# $KEEP_ROOT (outlives the calls while the machine is warm). Logs and JSON come back as one
# archive, $OUT/stageN.tgz (a call returns at most 8 files).
#   stage 1: GPU tests (sampling at a 128k vocabulary, runtime, TP world-size-1 NCCL) on B, then
#            the 8B TP 1 engines built on B; the 8B speculative engines built and timed greedy vs
#            sampled on A (bench_decode), then the TP 2 engines built on A; last, the 2-GPU TP
#            test alone
#   stage 2: SmolLM2 assembled from the GGUF parts (one per call: PARTS_DIR), then bench_pair on A
#            (T = 0, 0.7, 1.0 vs transformers); on B: the TP engines finished, bench_batch's pair
#            engines, then its 8B engines
#   stage 3: bench_tp (both GPUs, alone), then bench_batch on A and bench_serve on B
# Usage: bash bench/gpu_x2.sh STAGE PARTS_DIR [SECONDS]   (SECONDS: this call's budget, 570)
set -uo pipefail
STAGE=${1:?usage: gpu_x2.sh STAGE PARTS_DIR [SECONDS]}
PARTS=${2:?usage: gpu_x2.sh STAGE PARTS_DIR [SECONDS]}
BUDGET=${3:-570}
. "$(dirname "$0")/gpu_env.sh"
KEEP_ROOT=${KEEP_ROOT:-/root/keep}
LOG="$OUT/w"; mkdir -p "$LOG" "$KEEP_ROOT/gq"
cp "$PARTS"/gq_0* "$KEEP_ROOT/gq/" 2>/dev/null
left() { echo $((BUDGET - SECONDS - ${1:-0})); }  # seconds left in this call, less a margin
PIN_A=(taskset -c 0-15); PIN_B=(taskset -c 16-31)
command -v taskset >/dev/null || { PIN_A=(); PIN_B=(); }
# A/B/T SECONDS CMD...: CMD on lane A, lane B or the whole machine, stopped after SECONDS (run
# only when more than 10 are left)
T() { local s=$1; shift; [ "$s" -gt 10 ] || return 124; timeout "$s" "$@"; }
A() { local s=$1; shift; CUDA_VISIBLE_DEVICES=0 T "$s" "${PIN_A[@]}" "$@"; }
B() { local s=$1; shift; CUDA_VISIBLE_DEVICES=1 T "$s" "${PIN_B[@]}" "$@"; }
PYTEST=(python3 -m pytest -v -p no:cacheprovider -rfE)  # -v: each outcome logged as it comes
D8=(python3 bench/bench_decode.py --shapes llama8b --draft-vocab 0 --skip-decode --engines "$KEEP_ROOT/eng8")
TP=(python3 bench/bench_tp.py --shape llama8b --tp 1,2 --engines "$KEEP_ROOT/tp")
BATCH=(python3 bench/bench_batch.py --device cuda --engines "$KEEP_ROOT/batch" --model "$SMOL")
finish() {
  echo "== stage $STAGE done at ${SECONDS}s"; nvidia-smi --query-gpu=name --format=csv,noheader | head -1
  tar czf "$OUT/stage$STAGE.tgz" -C "$LOG" . && rm -rf "$LOG"
}
echo "== stage $STAGE: $(nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd,)"
case "$STAGE" in
1)
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  (
    B 90 "${PYTEST[@]}" tests/test_sampling.py -m gpu > "$LOG/t_sampling.log" 2>&1; echo "sampling tests rc $?"
    B 360 "${PYTEST[@]}" tests/test_gpu_runtime.py -m gpu > "$LOG/t_runtime.log" 2>&1; echo "runtime tests rc $?"
    B 110 "${PYTEST[@]}" tests/test_tp.py -m "gpu and not multi_gpu" > "$LOG/t_tp1.log" 2>&1; echo "tp ws1 test rc $?"
    B "$(left 110)" "${TP[@]}" --tp 1 --build-only > "$LOG/tp1_build.log" 2>&1; echo "tp 1 build rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  A 380 "${D8[@]}" --build-only > "$LOG/build8b.log" 2>&1; echo "8B build rc $? at ${SECONDS}s"
  A "$(left 110)" "${D8[@]}" --no-peers --tpc 1.88 --out "$LOG/decode8b.json" > "$LOG/decode8b.log" 2>&1
  echo "8B decode bench rc $? at ${SECONDS}s"
  A "$(left 110)" "${TP[@]}" --tp 2 --build-only > "$LOG/tp2_build.log" 2>&1; echo "tp 2 build rc $? at ${SECONDS}s"
  wait $LANE_B
  T "$(left 15)" "${PYTEST[@]}" tests/test_tp.py -m multi_gpu > "$LOG/t_tp2.log" 2>&1; echo "tp2 test rc $?"
  for f in t_sampling t_runtime t_tp1 t_tp2; do echo "-- $f"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$LOG/$f.log" | grep -v "^tests.*PASSED" | tail -6; grep -c "PASSED" "$LOG/$f.log"; done
  grep -E "built|rror" "$LOG/build8b.log" "$LOG"/tp*_build.log | tail -8
  grep -v "^  \[" "$LOG/decode8b.log" | tail -12
  ;;
2)
  fetch_smollm2 "$KEEP_ROOT/gq" > "$LOG/fetch.log" 2>&1 || { tail -5 "$LOG/fetch.log"; finish; exit 1; }
  (
    B "$(left 30)" "${TP[@]}" --build-only > "$LOG/tp_build2.log" 2>&1; echo "tp build rc $? at ${SECONDS}s"
    B "$(left 30)" "${BATCH[@]}" --shapes pair --build-only > "$LOG/batch_build_pair.log" 2>&1
    echo "pair batch build rc $? at ${SECONDS}s"
    B "$(left 30)" "${BATCH[@]}" --shapes llama8b --build-only > "$LOG/batch_build_8b.log" 2>&1
    echo "8B batch build rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  A "$(left 30)" python3 bench/bench_pair.py --model "$SMOL" --device cuda --engines "$KEEP_ROOT/eng" \
    --temperatures 0,0.7,1.0 --top-p 0.9 --hf-eager none --out "$LOG/pair_cuda.json" > "$LOG/pair_cuda.log" 2>&1
  echo "bench_pair rc $? at ${SECONDS}s"
  wait $LANE_B
  grep -E "built|rror|auto:" "$LOG"/*build*.log | tail -12
  grep -v "^\[\|^  \|^T=" "$LOG/pair_cuda.log" | tail -24
  ;;
3)
  fetch_smollm2 "$KEEP_ROOT/gq" > "$LOG/fetch.log" 2>&1 || { tail -5 "$LOG/fetch.log"; finish; exit 1; }
  T 150 "${TP[@]}" --out "$LOG/tp_cuda.json" > "$LOG/tp.log" 2>&1; echo "bench_tp rc $? at ${SECONDS}s"
  tail -6 "$LOG/tp.log"
  (
    SERVE_ENGINE="$KEEP_ROOT/batch/pair-ours_dispatch-cuda"
    B "$(left 20)" python3 bench/bench_serve.py --engine "$SERVE_ENGINE" --model "$SMOL" --rates 1,4,16,inf \
      --n 64 --peer cb --out "$LOG/serve_cuda.json" > "$LOG/serve.log" 2>&1
    echo "bench_serve rc $? at ${SECONDS}s"
  ) &
  LANE_B=$!
  SHAPES=pair; [ -f "$KEEP_ROOT/batch/llama8b-ours_forced-cuda/manifest.json" ] && SHAPES=pair,llama8b
  A "$(left 20)" "${BATCH[@]}" --shapes "$SHAPES" --out "$LOG/batch_cuda.json" > "$LOG/batch.log" 2>&1
  echo "bench_batch ($SHAPES) rc $? at ${SECONDS}s"
  wait $LANE_B
  tail -22 "$LOG/batch.log"; tail -14 "$LOG/serve.log"
  ;;
*) echo "unknown stage $STAGE: 1, 2 or 3"; exit 2 ;;
esac
finish
