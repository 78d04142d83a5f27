#!/usr/bin/env bash
# Superseded by bench/gpu_accept.sh (every draft in drafts/, the trees, the data-size curve); kept
# because BENCHMARKS.md names it for the H100 acceptance table of 2026-11-26.
# Acceptance of SmolLM2 + its drafts on one GPU, in one call: every (draft, tree) compiled and
# evaluated in parallel processes (acceptance does not depend on the sharing; time does).
# Usage: bash bench/gpu_acceptance.sh [PARTS_DIR]   (after bench/gpu_train.sh: its drafts)
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
fetch_smollm2 "${1:?usage: gpu_acceptance.sh PARTS_DIR}" || exit 1
restore_drafts
D=drafts/smollm2-eagle,drafts/smollm2-eagle-2l
timeout 560 python3 bench/bench_acceptance.py "$SMOL" --drafts $D --trees auto,mc_sim_7b_63,chain-3,chain-5 \
  --device cuda --jobs 8 --out "$OUT/acceptance.json" > "$OUT/acceptance.log" 2>&1 &
timeout 560 python3 bench/bench_acceptance.py "$SMOL" --drafts $D --trees mc_sim_7b_63 --draft-vocab full \
  --device cuda --jobs 2 --out "$OUT/acceptance_full.json" > "$OUT/acceptance_full.log" 2>&1 &
wait
grep -v "^\[\|DEBUG\|^W1\|^I1" "$OUT/acceptance.log" | tail -12
tail -4 "$OUT/acceptance_full.log"
nvidia-smi --query-gpu=name --format=csv,noheader
