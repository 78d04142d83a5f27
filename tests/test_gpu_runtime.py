"""GPU runtime: CUDA engines, one CUDA-graph replay per step with no host sync, AOTInductor
packages that load without hand-set environment variables. Skipped without a GPU."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import build_engine, check_first_two_tokens, hf_greedy

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


def test_eagle3_draft_on_cuda_matches_transformers(tmp_path):
    """An EAGLE-3 head (fused target layers, its own vocabulary) through Inductor on CUDA."""
    from spec_compiler.runtime import Engine
    from helpers import make_tiny_checkpoint
    from test_eagle3 import eagle3_state, write_eagle3

    target = make_tiny_checkpoint(tmp_path / "target", num_hidden_layers=4)
    head = write_eagle3(tmp_path / "head", eagle3_state(seed=2))
    out = build_engine(tmp_path / "e3", target, draft_dir=head, backend="inductor", device="cuda",
                       dtype="float32", max_seq_len=256)
    engine = Engine.load(out)
    for p in (PROMPT, [9] * 40):
        assert engine.generate(p, max_new_tokens=60).output_ids == hf_greedy(target, p, 60)


@functools.cache
def loaded(engine_dir: Path):
    """One loaded engine per directory for this module (loading and capturing every bucket is
    most of a test's time). A test starts from it with every slot freed: `capture()` frees
    them (the graphs captured before are kept)."""
    from spec_compiler.runtime import Engine

    engine = Engine.load(engine_dir)
    engine.capture()
    return engine


def steps_without_sync(engine, n: int) -> list:
    """Run n engine.step() calls with CUDA's sync-debug mode set to error (a host sync inside
    a step raises); returns the captured steps replayed, in order."""
    from spec_compiler.runtime import cuda_graph

    replays = []
    orig = cuda_graph.CapturedStep.__call__

    def counting(self):
        replays.append(self)
        orig(self)
    cuda_graph.CapturedStep.__call__ = counting
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(n):
            engine.step()
    finally:
        cuda_graph.CapturedStep.__call__ = orig
        torch.cuda.set_sync_debug_mode("default")
    return replays


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_step_is_one_replay_without_sync(fp32_engine, temperature):
    engine = loaded(fp32_engine)
    engine.capture()
    engine.generate(PROMPT, max_new_tokens=8)  # prefill + a few steps, outside sync checking
    engine.start(PROMPT, temperature=temperature, seed=3)  # no max_new_tokens: to the capacity
    replays = steps_without_sync(engine, 6)
    assert len(replays) == 6  # one replay per speculative step (draft + verify + accept)
    steps = int(engine.state["n_steps"][0])
    # Every replay was a step, unless the sequence ended (a sampled EOS) in between.
    assert steps >= 6 or (steps >= 1 and not engine.running())


# --max-batch 4 (buckets 1, 2, 4) with one tree, and with a tree per bucket as the dispatcher may
# choose: plain decoding at bucket 2 between speculative buckets, so a batch shrinking 4 -> 2 -> 1
# runs its sequences through the draft's cache catch-up on the GPU
PER_BUCKET = ("mc_sim_7b_63", "chain-0", "chain-2")


@pytest.fixture(scope="module", params=["one-tree", "per-bucket"])
def batch_engine(request, tmp_path_factory, tiny_dir, tiny_draft_dir):
    trees = list(PER_BUCKET) if request.param == "per-bucket" else None
    return build_engine(tmp_path_factory.mktemp("gpu") / request.param, tiny_dir, draft_dir=tiny_draft_dir,
                        backend="inductor", device="cuda", dtype="float32", max_seq_len=256, max_batch=4,
                        bucket_trees=trees)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("n_live", [1, 2, 3, 4])
def test_every_bucket_steps_in_one_replay_without_sync(batch_engine, n_live, temperature):
    """--max-batch 4 (buckets 1, 2, 4): with n_live sequences admitted, each step() after their
    prefill is one CUDA-graph replay of the smallest bucket holding them, with no host sync."""
    engine = loaded(batch_engine)
    engine.capture()
    slots = [engine.admit(PROMPT[:6 + 2 * i], temperature=temperature, seed=i) for i in range(n_live)]
    assert slots == list(range(n_live))
    engine.step()  # every prompt fits one chunk: prefilled (host syncs allowed), then one step
    replays = steps_without_sync(engine, 6)
    assert len(replays) == 6 and len(set(map(id, replays))) == 1  # one captured step: one bucket
    bucket = {1: 1, 2: 2, 3: 4, 4: 4}[n_live]
    verify = "verify_sampled" if temperature > 0 else "verify"
    assert replays[0] is engine._captured[(verify, bucket)]


def test_batched_cuda_greedy_equals_solo(batch_engine, tiny_dir):
    """float32 on the GPU: every sequence of a batch (more prompts than slots) equals transformers'
    greedy decoding of it alone; with a tree per bucket, also across the plain bucket."""
    engine = loaded(batch_engine)
    prompts = [PROMPT[:4 + 3 * i] for i in range(6)]
    results = engine.generate_batch(prompts, max_new_tokens=[40, 12, 30, 25, 40, 8])
    for p, n, r in zip(prompts, [40, 12, 30, 25, 40, 8], results):
        assert r.output_ids == hf_greedy(tiny_dir, p, n), p


def test_admission_prefills_without_host_sync(batch_engine, tiny_dir):
    """A prompt admitted while another slot decodes is prefilled (three chunks: one captured
    replay each) and armed with no host sync, the other slot stepping in between; both outputs
    equal transformers' greedy decoding."""
    long = [9] * 40  # chunks of 16: three
    engine = loaded(batch_engine)
    engine.capture()
    engine.generate_batch([PROMPT, long], max_new_tokens=4)  # captures slots 0 and 1's prefill
    with engine.session():
        engine._free_all()
        assert engine.admit(PROMPT, max_new_tokens=30) == 0
        engine.step()
        assert engine.admit(long, max_new_tokens=30) == 1
        replays = steps_without_sync(engine, 6)
        assert sum(r is engine._captured[("prefill", 1)] for r in replays) == 3
        assert len(replays) == 9  # and one step replay per step()
        while engine.running():
            engine.step()
        res = engine.finished()
    assert res[0].output_ids == hf_greedy(tiny_dir, PROMPT, 30)
    assert res[1].output_ids == hf_greedy(tiny_dir, long, 30)


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


def check_bf16_divergences(out: list[int], prompt: list[int], model_dir: Path, max_new: int,
                           eos: list[int], device: str) -> list[tuple]:
    """Assert that a bf16 engine's greedy output `out` departs from transformers' bf16 greedy
    output only at near-ties; returns the divergences (position, transformers' token, engine's
    token, float32 gap, tolerance).

    Walk `out`: transformers (bf16) continues the engine's own prefix greedily; where the two
    first differ (position i, token a from transformers, b from the engine), the float32 logits
    of a and b on that prefix must be within 2*eps; then the walk resumes after the engine's
    token. Where nothing differs, the rest is equal, to the same stop. eps is the bf16 logit
    error measured on this very sequence: max |bf16 logits - float32 logits| of transformers
    over every position where a token was chosen and the whole vocabulary (one forward each).

    The tolerance, derived: a bf16 implementation picks the argmax of l16 = l32 + e, |e| <= eps.
    transformers picks a, so l16[a] >= l16[b] and l32[b] - l32[a] <= e[a] - e[b] <= 2*eps; the
    engine picks b, so l32[a] - l32[b] <= 2*eps likewise, its bf16 error being of the same size
    (same bf16 weights, same bf16 activations). eps is the maximum over the whole sequence, not
    one position, because the engine's error at a position is another draw from that error,
    correlated with transformers' but not equal to it. A wrong token fails by a wide margin: the
    tiny model's logits are decisive (std ~ 2.4) against a bf16 error of a few tenths.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    hf = {dt: LlamaForCausalLM.from_pretrained(model_dir, dtype=dt).to(device).eval()
          for dt in (torch.bfloat16, torch.float32)}
    P, found, i = len(prompt), [], 0
    with torch.no_grad():
        seq = torch.tensor([prompt + out], device=device)
        # Row P - 1 + k: the logits that choose out[k] (causal: they see prompt + out[:k] only).
        l32, l16 = (hf[dt](seq).logits[0, P - 1:P - 1 + len(out)].float()
                    for dt in (torch.float32, torch.bfloat16))
        tol = 2 * float((l16 - l32).abs().max())
        while i < len(out):
            gc = GenerationConfig(do_sample=False, max_new_tokens=max_new - i,
                                  eos_token_id=eos or None, pad_token_id=0)
            ref = hf[torch.bfloat16].generate(seq[:, :P + i], generation_config=gc)[0, P + i:].tolist()
            j = next((k for k, (a, b) in enumerate(zip(ref, out[i:])) if a != b), None)
            if j is None:  # no (further) divergence: the same tokens, to the same stop
                assert out[i:] == ref, (i, out[i:], ref)
                break
            pos, a, b = i + j, ref[j], out[i + j]
            gap = abs(float(l32[pos, a] - l32[pos, b]))
            found.append((pos, a, b, round(gap, 4), round(tol, 4)))
            assert gap <= tol, (f"token {pos}: the engine chose {b}, transformers {a}; "
                                f"float32 logit gap {gap:.4f} > 2*eps = {tol:.4f}")
            i = pos + 1
    return found


def test_bf16_engine_diverges_only_at_near_ties(tmp_path, tiny_dir, tiny_draft_dir):
    """bf16: token identity with transformers' bf16 output is not promised (kernels round
    differently), but every departure must be a near-tie within the measured bf16 error."""
    from spec_compiler.runtime import Engine

    eng = Engine.load(build_engine(tmp_path / "bf16", tiny_dir, draft_dir=tiny_draft_dir,
                                   backend="inductor", device="cuda", dtype="bfloat16"))
    res = eng.generate(PROMPT, max_new_tokens=64)
    assert len(res.output_ids) >= 1 and res.verify_calls >= 1
    found = check_bf16_divergences(res.output_ids, PROMPT, tiny_dir, 64,
                                   list(eng.spec.model.eos_token_ids), "cuda")
    print(f"bf16 engine vs transformers bf16: {len(res.output_ids)} tokens, divergences "
          f"(position, hf, engine, float32 gap, tolerance): {found}")


def test_sampling_on_cuda_is_lossless_and_replays(fp32_engine, tiny_dir):
    """The CUDA engine at T > 0: a seed replays exactly, and the first two tokens are distributed
    as the target's (the chi-square check of test_sampling_engine, on the GPU)."""
    engine = loaded(fp32_engine)
    a = engine.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=5)
    assert a.output_ids == engine.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=5).output_ids
    check_first_two_tokens(engine, tiny_dir, PROMPT, 400)
