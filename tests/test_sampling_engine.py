"""Sampling through an engine (eager backend, tiny checkpoint): the interface, seeds that replay,
greedy bit for bit at temperature 0, and the first two tokens distributed as the target's."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import build_engine, check_first_two_tokens, hf_greedy, with_eos
from spec_compiler.errors import SpecCompileError
from spec_compiler.runtime import Engine
from test_cli import assert_clean_error, run
from test_sampling import chi_square_pvalue

PROMPT = [5, 9, 33, 2, 71, 8]


@pytest.fixture(scope="module")
def no_eos_dir(tmp_path_factory, tiny_dir):
    """The tiny checkpoint without EOS: every generation runs to max_new_tokens."""
    return with_eos(tiny_dir, tmp_path_factory.mktemp("noeos") / "m", None)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, no_eos_dir, tiny_draft_dir):
    return build_engine(tmp_path_factory.mktemp("samp") / "e", no_eos_dir, draft_dir=tiny_draft_dir,
                        max_seq_len=96)


@pytest.fixture(scope="module")
def engine(engine_dir):
    return Engine.load(engine_dir)


def test_same_seed_same_tokens_different_seeds_differ(engine):
    a = engine.generate(PROMPT, max_new_tokens=24, temperature=1.0, seed=7)
    b = engine.generate(PROMPT, max_new_tokens=24, temperature=1.0, seed=7)
    assert a.output_ids == b.output_ids and a.seed == b.seed == 7
    outs = [tuple(engine.generate(PROMPT, max_new_tokens=24, temperature=1.0, seed=s).output_ids)
            for s in range(100, 140)]
    assert len(set(outs)) >= 38  # 20 pairs of different seeds: (almost) all outputs differ
    fresh = engine.generate(PROMPT, max_new_tokens=24, temperature=0.8)
    assert isinstance(fresh.seed, int) and fresh.to_json()["seed"] == fresh.seed
    replay = engine.generate(PROMPT, max_new_tokens=24, temperature=0.8, seed=fresh.seed)
    assert replay.output_ids == fresh.output_ids


def test_temperature_zero_is_greedy(engine, no_eos_dir):
    res = engine.generate(PROMPT, max_new_tokens=30, temperature=0.0, top_p=0.5, top_k=3, seed=1)
    assert res.output_ids == hf_greedy(no_eos_dir, PROMPT, 30)
    assert res.seed is None and res.to_json()["seed"] is None


def test_a_sequence_does_not_depend_on_its_batch_slot(engine):
    """Each sequence's tokens are a function of its own prompt and seed: run alone and in a
    batch (when the engine batches, each slot of a batch) they agree. Batch 1 today."""
    runs = [(PROMPT, 3), (PROMPT[:4], 4), (PROMPT, 5)]
    alone = [engine.generate(p, max_new_tokens=16, temperature=1.0, seed=s).output_ids for p, s in runs]
    together = [engine.generate(p, max_new_tokens=16, temperature=1.0, seed=s).output_ids
                for p, s in reversed(runs)][::-1]
    assert together == alone


@pytest.mark.parametrize("kw, word", [
    (dict(temperature=-0.1), "--temperature"), (dict(temperature=float("nan")), "--temperature"),
    (dict(temperature="1"), "--temperature"), (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(top_k=-1), "--top-k"), (dict(top_k=2.5), "--top-k"), (dict(top_k=True), "--top-k"),
    (dict(temperature=1.0, seed=1.5), "--seed"), (dict(temperature=1.0, seed="7"), "--seed"),
    (dict(temperature=1.0, seed=1 << 64), "--seed"),
])
def test_invalid_sampling_values_are_refused(engine, kw, word):
    with pytest.raises(SpecCompileError, match=word):
        engine.generate(PROMPT, max_new_tokens=4, **kw)


def test_first_two_tokens_are_distributed_as_the_target(engine, no_eos_dir):
    """N seeds through the engine (prefill's draw, then one speculative step over the 26-node
    tree): the empirical distribution of the second token, and of the first, match the
    target's (transformers, T = 2, top-p 0.95: the tiny model is peaked, so a high temperature
    spreads its mass over enough tokens for a test with few draws) by a chi-square test. The
    exactness itself is tested at scale in test_sampling.py; this checks the engine's plumbing
    (prefill's draw, the verify graph's sampling, seeds) with 300 draws."""
    check_first_two_tokens(engine, no_eos_dir, PROMPT, 300)


def test_spec_run_sampling_flags(engine_dir, engine):
    args = (engine_dir, "--prompt-ids", "5,9,33", "--max-new-tokens", "12", "--json")
    r1, r2 = (run(*args, "--temperature", "0.9", "--top-k", "20", "--seed", "42") for _ in range(2))
    assert r1.returncode == r2.returncode == 0, r1.stderr
    d = json.loads(r1.stdout)
    assert d["seed"] == 42 and json.loads(r2.stdout)["output_ids"] == d["output_ids"]
    assert d["output_ids"] == engine.generate([5, 9, 33], max_new_tokens=12, temperature=0.9,
                                              top_k=20, seed=42).output_ids
    greedy = json.loads(run(*args).stdout)
    assert greedy["seed"] is None
    for flags, word in ((["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"),
                        (["--top-k", "2.5"], "--top-k"), (["--temperature", "1", "--seed", "x"], "--seed")):
        assert_clean_error(run(*args, *flags), word)


def test_greedy_only_engine(tmp_path, no_eos_dir, tiny_draft_dir):
    """--no-sampling: no verify_sampled graph, greedy unchanged, temperature > 0 refused."""
    out = build_engine(tmp_path / "g", no_eos_dir, draft_dir=tiny_draft_dir, max_seq_len=96,
                       sampling=False)
    eng = Engine.load(out)
    assert "verify_sampled" not in eng.graphs and "verify" in eng.graphs
    assert eng.generate(PROMPT, max_new_tokens=12).output_ids == hf_greedy(no_eos_dir, PROMPT, 12)
    with pytest.raises(SpecCompileError, match="--no-sampling"):
        eng.generate(PROMPT, max_new_tokens=4, temperature=0.5)


def test_synthetic_start_samples_with_its_seed(engine):
    """start_synthetic (the benchmarks' timed steps) at temperature > 0 runs the sampled verify
    graph with the given seed: the same seed replays, another seed draws other tokens, and
    greedy differs from both; a bad temperature is refused like generate's."""
    def run(**kw):
        engine.start_synthetic(16, **kw)
        calls = []
        graph = engine.graphs["verify_sampled"]
        engine.graphs["verify_sampled"] = lambda *a, **k: calls.append(1) or graph(*a, **k)
        try:
            for _ in range(4):
                engine.step()
        finally:
            engine.graphs["verify_sampled"] = graph
        return engine.state["out_buf"][0, :4].tolist(), len(calls)

    a, n_sampled = run(temperature=1.0, seed=3)
    assert n_sampled == 4 and run(temperature=1.0, seed=3)[0] == a
    assert run(temperature=1.0, seed=4)[0] != a
    assert run()[1] == 0
    with pytest.raises(SpecCompileError, match="temperature"):
        engine.start_synthetic(16, temperature=-1.0)
