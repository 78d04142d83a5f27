# Sourced by bench/gpu_session.sh and bench/gpu_draft.sh: one background job on a GPU machine
# that outlives the 10-minute calls (started with setsid, it runs on while the machine is held).
# The first call (`start`) copies the repository aside, installs it from there and launches the
# script's `drive`; each later call (`watch`) waits for it. Every call copies the GGUF part it
# carries (PARTS_DIR) to $KEEP_ROOT/gq, where the job assembles SmolLM2 once both have arrived.
# The job lives only as long as the machine: one left idle for half a minute between calls is
# handed back, the job with it, so make each call as soon as the last returns.
# `patch` is a `watch` that first copies this call's Python sources over the job's copy: a fix
# made during the session reaches the job's later steps (each step is a fresh process).
# The caller sets JOB (its state lives in $KEEP_ROOT/$JOB) and takes MODE PARTS_DIR [SECONDS].
MODE=${1:?usage: bash SCRIPT start|watch|patch PARTS_DIR [SECONDS]}
PARTS=${2:-}
BUDGET=${3:-540}
KEEP_ROOT=${KEEP_ROOT:-$HOME/keep}
SRC="$KEEP_ROOT/src"; LOG="$KEEP_ROOT/$JOB/log"
OUT=${OUT:-/tmp/out}
mkdir -p "$LOG" "$KEEP_ROOT/gq" "$OUT"
[ -n "$PARTS" ] && cp "$PARTS"/gq_0* "$KEEP_ROOT/gq/" 2>/dev/null
# BRING=1 (set by the caller): drafts and corpora too large to travel in one call come over
# several; each later call adds the files of its drafts/ and corpora/ that the job's copy lacks
# (never overwriting; the job checks them)
if [ -n "${BRING:-}" ] && [ -d "$SRC" ] && [ "$MODE" != drive ] && [ "$MODE" != start ]; then
  for d in drafts corpora; do [ -d "$d" ] && mkdir -p "$SRC/$d" && cp -rn "$d/." "$SRC/$d/"; done
fi

say() { echo "[$(date +%T) ${SECONDS}s] $*" >> "$LOG/lanes.log"; }
# run NAME CPUS GPU CMD...: one step, logged to $LOG/NAME.log, its outcome to lanes.log
run() {
  local name=$1 cpus=$2 gpu=$3; shift 3
  say "$name: start"
  local t=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpu taskset -c "$cpus" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  say "$name: rc $rc after $((SECONDS - t)) s"
  return $rc
}
# job_start SCRIPT: the first call's setup, then SCRIPT's drive in the background
job_start() {
  rm -rf "${LOG:?}"/* "$SRC" && mkdir -p "$SRC" && cp -a . "$SRC/" && cd "$SRC" || exit 1
  . bench/gpu_env.sh  # the editable install now maps to this copy, which later calls do not touch
  nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd, > "$LOG/versions.txt"
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'triton', triton.__version__)" >> "$LOG/versions.txt" 2>&1
  nproc >> "$LOG/versions.txt"
  setsid nohup bash "$1" drive > "$LOG/driver.log" 2>&1 < /dev/null &
}
# job_wait: until the job is done (it touches $LOG/ALL_DONE) or this call's SECONDS budget is
# nearly spent; prints the lanes' log
job_wait() {
  until [ -f "$LOG/ALL_DONE" ] || [ "$SECONDS" -ge $((BUDGET - 20)) ]; do sleep 10; done
  echo "== watch ended at ${SECONDS}s ($([ -f "$LOG/ALL_DONE" ] && echo 'all done' || echo 'still running'))"
  tail -40 "$LOG/lanes.log"
}
# fetch_model CPUS GPU: wait for both GGUF parts, then SmolLM2 into $SMOL (gpu_env.sh)
fetch_model() {
  until [ "$(ls "$KEEP_ROOT/gq" | wc -l)" -ge 2 ]; do sleep 5; done
  run fetch "$1" "$2" bash -c ". bench/gpu_env.sh && fetch_smollm2 '$KEEP_ROOT/gq'"
}
# job_main SCRIPT: the mode's work, with the caller's `watch` (what a call prints and returns) and
# `drive` (the job itself, run from the repository copy with the environment of gpu_env.sh)
job_main() {
  case "$MODE" in
  start) job_start "$1"; watch ;;
  watch) watch ;;
  patch) for d in spec_compiler passes runtime export bench tests; do cp -a "$d/." "$SRC/$d/"; done
         say "patched: the sources of a later call"; watch ;;
  drive) cd "$SRC" || exit 1; . bench/gpu_env.sh; drive ;;
  *) echo "unknown mode $MODE: start, watch, patch or drive"; exit 2 ;;
  esac
}
