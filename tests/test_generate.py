"""End to end (eager backend, fast): greedy speculative output == transformers' greedy output.

Random drafts (almost never accepted) on several tiny Llama configurations and every tree kind;
an oracle draft (tests/helpers.py) that is right on a non-first branch at varying depths, so
acceptance and KV compaction are exercised with known accepted lengths; stops at EOS, at
max-new-tokens and at the context limit; drafts with a reduced (hot-token) vocabulary, whose
oracle cannot propose a token outside its hot set. The Inductor backend is covered in
test_engine_inductor.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (HOT_IDS, OracleDraft, build_engine, expected_emitted, hf_greedy, make_random_draft,
                     oracle_hot_ids, with_eos)
from spec_compiler.runtime import Engine
from spec_compiler.loading import load_draft, load_target
from spec_compiler.trees import resolve_tree

PROMPT_LENS = (1, 16, 37)  # one token, exactly one prefill chunk, several chunks


def prompts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_dirs):
    """(config, tree, draft layers) -> engine dir, built once for the module."""
    root = tmp_path_factory.mktemp("engines")
    built = {}
    user_tree = root / "user_tree.json"
    user_tree.write_text(json.dumps([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))
    cases = [("gqa_untied", "mc_sim_7b_63", 1), ("mha_tied", "mc_sim_7b_63", 2),
             ("llama3_rope", "mc_sim_7b_63", 1), ("gqa_untied", "chain-3", 1),
             ("gqa_untied", str(user_tree), 1), ("gqa_untied", "chain-0", 0)]
    for name, tree, layers in cases:
        model_dir = tiny_dirs[name]
        draft_dir = make_random_draft(root / f"draft_{name}_{layers}", model_dir, n_layers=layers) if layers else None
        out = root / f"{name}_{resolve_tree(tree).name}_{layers}"
        built[(name, resolve_tree(tree).name, layers)] = build_engine(out, model_dir, tree=tree, draft_dir=draft_dir)
    return built


@pytest.mark.parametrize("case", [("gqa_untied", "mc_sim_7b_63", 1), ("mha_tied", "mc_sim_7b_63", 2),
                                  ("llama3_rope", "mc_sim_7b_63", 1), ("gqa_untied", "chain-3", 1),
                                  ("gqa_untied", "user_tree", 1), ("gqa_untied", "chain-0", 0)],
                         ids=lambda c: "-".join(map(str, c)))
def test_random_draft_matches_transformers(engines, tiny_dirs, case):
    engine = Engine.load(engines[case])
    model_dir = tiny_dirs[case[0]]
    for p in prompts():
        res = engine.generate(p, max_new_tokens=40)
        ref = hf_greedy(model_dir, p, 40)
        assert res.output_ids == ref, (p, res.output_ids, ref)
        assert res.stop_reason == ("eos" if ref[-1] in engine.spec.model.eos_token_ids else "max_new_tokens")
        assert res.verify_calls >= 1 and res.tokens_per_call >= 1.0


def test_stops_at_eos(tmp_path, tiny_dir, tiny_draft_dir):
    """EOS chosen as a token that greedy decoding emits mid-way: both stop there, EOS included."""
    p = prompts(1)[2]
    free = hf_greedy(tiny_dir, p, 40, eos=[])
    k = next(i for i in range(8, 40) if free[i] not in free[:i])
    model_dir = with_eos(tiny_dir, tmp_path / "eos_model", [free[k]])
    engine = Engine.load(build_engine(tmp_path / "e", model_dir, draft_dir=tiny_draft_dir))
    res = engine.generate(p, max_new_tokens=60)
    assert res.stop_reason == "eos"
    assert res.output_ids == free[:k + 1] == hf_greedy(model_dir, p, 60)


ORACLE_CASES = {
    # tree -> (rank of the right token at position p, positions where the draft is wrong)
    "chain-5": (lambda p: 0, lambda p: p % 7 in (0, 3)),
    "mc_sim_7b_63": (lambda p: (p // 2) % 2, lambda p: p % 9 in (0, 4)),
}


@pytest.mark.parametrize("tree", ["chain-0", "chain-5", "mc_sim_7b_63"])
def test_stops_at_context_limit(tmp_path, tiny_dir, tiny_draft_dir, tree):
    """No EOS and no max-new-tokens: generation runs until the next step would not fit, with
    the exact token count that rule gives. An oracle draft (known acceptance) makes the count
    for speculative trees exact too; chain-0 is plain decoding (one token per step)."""
    M, P = 96, 20
    model_dir = with_eos(tiny_dir, tmp_path / "no_eos", None)
    p = torch.randint(3, 128, (P,), generator=torch.Generator().manual_seed(5)).tolist()
    seq = p + hf_greedy(model_dir, p, M)  # more tokens than the context can take
    assert len(seq) == P + M, "the EOS-free reference stopped early"
    t = resolve_tree(tree)
    rank_of, poisoned = ORACLE_CASES.get(tree, (None, None))
    oracle = None
    if t.n_nodes > 1:
        inner = load_draft(tiny_draft_dir, load_target(model_dir))
        oracle = OracleDraft(inner, seq, capacity=256, vocab=128, rank_of=rank_of, poisoned=poisoned)
    engine = Engine.load(build_engine(tmp_path / "e", model_dir, tree=tree, draft_dir=tiny_draft_dir,
                                      draft_module=oracle, max_seq_len=M))
    assert engine.spec.model.eos_token_ids == () and engine.spec.max_seq_len == M
    res = engine.generate(p)  # no max_new_tokens: until the capacity

    # The rule: after n tokens the cache holds P + n - 1 of them (the last is the next step's
    # root), and a step writes D + 1 slots past that (the accepted path, compacted; the tree's
    # own K/V never reach the cache); generation stops once the next step would not fit, i.e.
    # at the first n with P + n - 1 + (D + 1) > M.
    scratch = t.max_depth + 1
    per_step = expected_emitted(t, P, M, rank_of, poisoned) if oracle else [1] * M
    n, accepts = 1, []
    while P + n - 1 + scratch <= M:
        accepts.append(per_step[len(accepts)])
        n += accepts[-1]
    if tree == "chain-0":
        assert scratch == 1 and n == M - P + 1  # plain decoding fills the cache exactly
    else:
        assert max(accepts) > 1, "the oracle's drafts should be accepted"
    assert res.stop_reason == "length"
    assert len(res.output_ids) == n
    assert res.accept_lengths == accepts
    assert res.output_ids == seq[P:P + n]


@pytest.mark.parametrize("tree", list(ORACLE_CASES))
def test_oracle_draft_acceptance_and_compaction(tmp_path, tiny_dir, tiny_draft_dir, tree):
    rank_of, poisoned = ORACLE_CASES[tree]
    P, N = 11, 90
    p = torch.randint(3, 128, (P,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = p + hf_greedy(tiny_dir, p, 300, eos=[])
    inner = load_draft(tiny_draft_dir, load_target(tiny_dir))
    oracle = OracleDraft(inner, seq, capacity=256, vocab=128, rank_of=rank_of, poisoned=poisoned)
    engine = Engine.load(build_engine(tmp_path / "e", tiny_dir, tree=tree, draft_dir=tiny_draft_dir,
                                      draft_module=oracle))
    res = engine.generate(p, max_new_tokens=N)
    assert res.output_ids == seq[P:P + N]
    expected = expected_emitted(resolve_tree(tree), P, res.verify_calls, rank_of, poisoned)
    assert res.accept_lengths[:-1] == expected[:-1]
    assert res.accept_lengths[-1] <= expected[-1]  # the last step is cut at max_new_tokens
    assert len(set(expected)) >= 3, "the oracle should accept at several depths"
    assert res.tokens_per_call > 2.0


def test_hot_vocab_draft_matches_transformers(tmp_path, tiny_dir, tiny_hot_draft_dir):
    """A random draft with 48 hot tokens: output is still transformers' greedy output, and the
    engine stores the hot lm_head rows (its own tensor) and the ids as draft weights."""
    from safetensors.torch import load_file

    out = build_engine(tmp_path / "e", tiny_dir, draft_dir=tiny_hot_draft_dir)
    m = json.loads((out / "manifest.json").read_text())
    assert m["draft"]["draft_vocab_size"] == 48
    assert "draft.hot_ids" in m["graphs"]["draft"]["weights"]
    assert "draft.lm_head.weight" in m["graphs"]["draft"]["weights"]
    assert not [w for w in m["graphs"]["draft_prefill"]["weights"] if "hot_ids" in w or "lm_head" in w]
    w = load_file(out / "weights.safetensors")
    assert torch.equal(w["draft.hot_ids"], torch.tensor(HOT_IDS))
    assert torch.equal(w["draft.lm_head.weight"], load_target(tiny_dir).lm_head.weight[HOT_IDS])
    engine = Engine.load(out)
    assert engine.spec.draft.draft_vocab_size == 48
    for p in prompts(2):
        res = engine.generate(p, max_new_tokens=40)
        assert res.output_ids == hf_greedy(tiny_dir, p, 40), p


def test_oracle_hot_vocab_cuts_acceptance(tmp_path, tiny_dir):
    """The oracle draft restricted to a hot set: where the target's next token is not hot the
    draft cannot propose it, so acceptance stops exactly there (and nowhere else): the top-k
    columns must be mapped to the right target ids, and only hot ids may be proposed."""
    rank_of, poisoned = ORACLE_CASES["mc_sim_7b_63"]
    tree = resolve_tree("mc_sim_7b_63")
    P, N = 11, 90
    p = torch.randint(3, 128, (P,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = p + hf_greedy(tiny_dir, p, 300, eos=[])
    hot = oracle_hot_ids()
    hot_dir = make_random_draft(tmp_path / "hot", tiny_dir, hot_ids=hot)
    oracle = OracleDraft(load_draft(hot_dir, load_target(tiny_dir)), seq, capacity=256, vocab=128,
                         rank_of=rank_of, poisoned=poisoned)
    engine = Engine.load(build_engine(tmp_path / "e", tiny_dir, tree="mc_sim_7b_63", draft_dir=hot_dir,
                                      draft_module=oracle))
    res = engine.generate(p, max_new_tokens=N)
    assert res.output_ids == seq[P:P + N]
    not_hot = lambda q: poisoned(q) or seq[q + 2] not in hot  # noqa: E731
    expected = expected_emitted(tree, P, res.verify_calls, rank_of, not_hot)
    assert res.accept_lengths[:-1] == expected[:-1]
    assert res.accept_lengths[-1] <= expected[-1]
    full = expected_emitted(tree, P, res.verify_calls, rank_of, poisoned)
    assert sum(expected[:-1]) < sum(full[:-1]), "no step was cut by the hot set"
    assert len(set(expected)) >= 3, "the oracle should still accept at several depths"
