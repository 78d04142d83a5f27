#!/usr/bin/env bash
# The main job: install, fetch + convert SmolLM2-135M-Instruct, compile it with the shipped
# EAGLE draft (--tree auto: the tree that is fastest on this machine), and answer a chat prompt:
# the text, then load time, tokens/s and tokens per verify call.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/SmolLM2-135M-Instruct
ENGINE=engines/smollm2-eagle
.venv/bin/spec-fetch-smollm2 --out "$MODEL"
if [ ! -f "$ENGINE/manifest.json" ]; then
  .venv/bin/spec-compile "$MODEL" --draft drafts/smollm2-eagle --out "$ENGINE" --max-seq-len 1024
fi
PROMPT="${1:-What is the capital of France? Answer in one sentence, then name two famous landmarks there.}"
# spec-run --json reports the generation (seconds, tokens/s, tokens/call); the load time is the
# rest of the command's wall time: Python + torch imports, Engine.load, the tokenizer.
start=$(date +%s.%N)
out=$(.venv/bin/spec-run "$ENGINE" --prompt "$PROMPT" --max-new-tokens 128 --json)
end=$(date +%s.%N)
.venv/bin/python - "$out" "$start" "$end" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
load = float(sys.argv[3]) - float(sys.argv[2]) - r["seconds"]
print(r.get("text", ",".join(map(str, r["output_ids"]))))
print(f"[load {load:.1f} s | {len(r['output_ids'])} tokens in {r['seconds']:.2f} s: "
      f"{r['tokens_per_second']:.1f} tokens/s, {r['tokens_per_call']:.2f} tokens/call over "
      f"{r['verify_calls']} verify calls, stop: {r['stop_reason']}]")
EOF
