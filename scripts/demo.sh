#!/usr/bin/env bash
# The main job: install, fetch + convert SmolLM2-135M-Instruct, compile it with the shipped
# EAGLE-3 draft (--tree auto: the tree expected to be fastest on this machine), and answer a chat
# prompt: the text, then one line with the engine's load time, tokens/s and tokens per verify call.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/SmolLM2-135M-Instruct
ENGINE=engines/smollm2-eagle3
.venv/bin/spec-fetch-smollm2 --out "$MODEL"
if [ ! -f "$ENGINE/manifest.json" ]; then
  .venv/bin/spec-compile "$MODEL" --draft drafts/smollm2-eagle-wide-eagle3 --out "$ENGINE" --max-seq-len 1024
fi
.venv/bin/spec-run "$ENGINE" --max-new-tokens 128 \
  --prompt "${1:-What is the capital of France? Answer in one sentence, then name two famous landmarks there.}"
