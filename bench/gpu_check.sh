#!/usr/bin/env bash
# One GPU job: environment facts, GPU tests (runtime, kernels), then benchmarks.
# Usage: bash bench/gpu_check.sh [tests|bench|all]
set -uo pipefail
MODE=${1:-all}
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
if [ "$MODE" != bench ]; then
  python3 -m pytest tests/test_gpu_runtime.py -m gpu -x -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_runtime.log" | tail -40
  python3 -m pytest tests/test_tree_attention_kernels.py tests/test_tree_attention_op.py -m gpu -q -p no:cacheprovider -x ${KERNEL_K:-} 2>&1 | tee "$OUT/kernels.log" | tail -15
fi
if [ "$MODE" != tests ]; then
  python3 bench/bench_attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -20
  python3 bench/bench_decode.py --out "$OUT/decode.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -40
fi
