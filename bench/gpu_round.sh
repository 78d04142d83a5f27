#!/usr/bin/env bash
# The GPU work of the sampling and fast-start issues in two back-to-back calls on one warm
# machine. The SmolLM2 GGUF (98 MB) travels in two parts beside the repository (one per call,
# each copied to $KEEP_ROOT, which outlives the calls while the machine stays warm):
#   stage 1: the sampling compile check at a 128k vocabulary, the GPU tests named in $TESTS_K
#            (all by default) and the kernel tests, while the
#            8B-shape speculative engine (greedy and sampled verify) compiles in the background;
#            then bench_decode times its greedy and sampled step
#   stage 2: SmolLM2 assembled and converted, then bench_pair on the GPU at T = 0, 0.7, 1.0
# Usage: bash bench/gpu_round.sh STAGE PARTS_DIR
set -uo pipefail
STAGE=${1:?usage: gpu_round.sh STAGE PARTS_DIR}
PARTS=${2:?usage: gpu_round.sh STAGE PARTS_DIR}
. "$(dirname "$0")/gpu_env.sh"
KEEP_ROOT=${KEEP_ROOT:-$HOME/keep}
mkdir -p "$KEEP_ROOT/gq" && cp "$PARTS"/gq_0* "$KEEP_ROOT/gq/" && ls "$KEEP_ROOT/gq"
case "$STAGE" in
1)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  # First, a minute's check that the sampling epilogue compiles on CUDA at a 128k vocabulary
  # (the 8B engine's sampled verify graph depends on it).
  timeout 120 python3 -m pytest tests/test_sampling.py -m gpu -q -p no:cacheprovider 2>&1 | tail -3
  D8="python3 bench/bench_decode.py --shapes llama8b --draft-vocab 0 --skip-decode --engines $KEEP_ROOT/eng"
  timeout 400 $D8 --build-only > "$OUT/build8b.log" 2>&1 &
  timeout 330 python3 -m pytest tests/test_gpu_runtime.py -m gpu -q -p no:cacheprovider -rfE ${TESTS_K:+-k "$TESTS_K"} \
    2>&1 | tee "$OUT/gpu_runtime.log" | grep -v "^\s*$" | tail -15
  timeout 120 python3 -m pytest tests/test_tree_attention_kernels.py tests/test_tree_attention_op.py -m gpu -q \
    -p no:cacheprovider 2>&1 | tee "$OUT/kernels.log" | tail -4
  wait
  grep -E "built|Error" "$OUT/build8b.log" | tail -5
  $D8 --no-peers --tpc 1.88 --out "$OUT/decode8b.json" 2>&1 | tee "$OUT/decode8b.log" | grep -v "^  \[" | tail -9
  ;;
2)
  fetch_smollm2 "$KEEP_ROOT/gq" || exit 1
  python3 bench/bench_pair.py --model "$SMOL" --device cuda --engines "$KEEP_ROOT/eng" \
    --temperatures 0,0.7,1.0 --top-p 0.9 --hf-eager none --out "$OUT/pair_cuda.json" 2>&1 \
    | tee "$OUT/pair_cuda.log" | grep -v "^\[\|^  \|^T=" | tail -22
  ;;
esac
