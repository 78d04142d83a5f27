"""GPU runtime: CUDA engines, one CUDA-graph replay per step with no host sync, AOTInductor
packages that load without hand-set environment variables. Skipped without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import build_engine, hf_greedy

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
PROMPT = [17, 45, 3, 99, 12, 7, 88, 23, 64, 31, 5]


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory, tiny_dir, tiny_draft_dir):
    return build_engine(tmp_path_factory.mktemp("gpu") / "fp32", tiny_dir, draft_dir=tiny_draft_dir,
                        backend="inductor", device="cuda", dtype="float32", max_seq_len=256)


def test_cuda_engine_matches_transformers(fp32_engine, tiny_dir):
    from spec_compiler.runtime import Engine

    t = time.time()
    engine = Engine.load(fp32_engine)
    print(f"engine load {time.time() - t:.2f}s")
    for p in (PROMPT, [9] * 40):
        res = engine.generate(p, max_new_tokens=60)
        assert res.output_ids == hf_greedy(tiny_dir, p, 60)


def test_hot_vocab_draft_on_cuda_matches_transformers(tmp_path, tiny_dir):
    """A reduced draft vocabulary through Inductor on CUDA: still exactly the target's tokens."""
    from spec_compiler.runtime import Engine
    from helpers import make_random_draft

    hot = list(range(3, 128, 2))  # every other id: the target's picks are often cold
    draft = make_random_draft(tmp_path / "hot_draft", tiny_dir, hot_ids=hot)
    out = build_engine(tmp_path / "hot", tiny_dir, draft_dir=draft, backend="inductor",
                       device="cuda", dtype="float32", max_seq_len=256)
    assert json.loads((out / "manifest.json").read_text())["draft"]["draft_vocab_size"] == len(hot)
    engine = Engine.load(out)
    for p in (PROMPT, [9] * 40):
        res = engine.generate(p, max_new_tokens=60)
        assert res.output_ids == hf_greedy(tiny_dir, p, 60)


def test_step_is_one_replay_without_sync(fp32_engine):
    from spec_compiler.runtime import Engine
    from spec_compiler.runtime import cuda_graph

    engine = Engine.load(fp32_engine)
    engine.capture()
    engine.generate(PROMPT, max_new_tokens=8)  # prefill + a few steps, outside sync checking
    replays = {"n": 0}
    orig = cuda_graph.CapturedStep.__call__

    def counting(self):
        replays["n"] += 1
        orig(self)
    cuda_graph.CapturedStep.__call__ = counting
    engine.start(PROMPT)  # no max_new_tokens: runs to the capacity
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(6):
            engine.step()
        torch.cuda.set_sync_debug_mode("default")
    finally:
        cuda_graph.CapturedStep.__call__ = orig
        torch.cuda.set_sync_debug_mode("default")
    assert replays["n"] == 6  # one replay per speculative step (draft + verify + accept)
    assert int(engine.state["n_steps"][0]) >= 6


def test_fresh_process_loads_without_env(fp32_engine, tiny_dir):
    """No LD_PRELOAD by hand: the runtime sets up what AOTInductor packages need."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(REPO)
    code = ("import json,sys; from spec_compiler.runtime import Engine; e=Engine.load(sys.argv[1]); "
            "print(json.dumps(e.generate(json.loads(sys.argv[2]), max_new_tokens=20).output_ids))")
    r = subprocess.run([sys.executable, "-c", code, str(fp32_engine), json.dumps(PROMPT)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert json.loads(r.stdout.strip().splitlines()[-1]) == hf_greedy(tiny_dir, PROMPT, 20)


def test_bf16_engine_first_divergence(tmp_path, tiny_dir, tiny_draft_dir):
    """bf16: exact identity is not promised; record where outputs first diverge."""
    from spec_compiler.runtime import Engine
    from transformers import LlamaForCausalLM

    eng = Engine.load(build_engine(tmp_path / "bf16", tiny_dir, draft_dir=tiny_draft_dir,
                                   backend="inductor", device="cuda", dtype="bfloat16"))
    res = eng.generate(PROMPT, max_new_tokens=64)
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    n = min(len(ref), len(res.output_ids))
    first = next((i for i in range(n) if ref[i] != res.output_ids[i]), None)
    print(f"bf16 first divergence from transformers bf16: {first} of {n}")
    assert len(res.output_ids) >= 1 and res.verify_calls >= 1
