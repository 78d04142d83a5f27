"""Sampling at temperature > 0 (spec_compiler/sampling.py): the warped distribution equals
transformers' warpers, the draws are counter-based, and speculative sampling over a tree is
lossless: the joint distribution of the first three generated tokens, sampled in one batch of
many seeds, matches the target's exact distribution (enumerated with transformers) by a
chi-square test, for a random and an oracle draft on two trees at two temperatures; the same
check rejects a subtly wrong rule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from spec_compiler import sampling
from spec_compiler.trees import TreeSpec

V = 8  # vocabulary: 8^3 = 512 cells for the first three tokens
P = 4  # prompt length
PROMPT = [3, 1, 4, 1]
N = 24_000  # seeds (rows), one batch
TREES = {"chain-2": [[0], [0, 0]], "bushy-2": [[0], [1], [2], [0, 0], [0, 1], [1, 0]]}
SETTINGS = {"T1": (1.0, 0, 1.0), "T0.7_p0.9": (0.7, 0, 0.9)}
N_TESTS = len(TREES) * 2 * len(SETTINGS)  # trees x drafts x settings: Bonferroni correction
ALPHA = 1e-3  # family-wise false-alarm rate of the lossless tests


@pytest.fixture(scope="module")
def tiny_v8(tmp_path_factory):
    """A tiny Llama with an 8-token vocabulary: next-token logits for every context of up to
    three generated tokens after PROMPT, by enumeration (one batched transformers forward)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.4,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    logits = {}
    with torch.no_grad():
        for n in range(4):
            ctx = list(itertools.product(range(V), repeat=n))
            ids = torch.tensor([PROMPT + list(c) for c in ctx])
            out = model(ids).logits[:, -1].float()
            for c, row in zip(ctx, out):
                logits[c] = row
    return logits


def _dist(logits, T, k, p):
    one = torch.ones(1)
    return sampling.warp(logits[None], one * T, torch.tensor([k]), one * p)[0]


def exact_joint(logits, setting) -> torch.Tensor:
    """(V, V, V): the target's probability of each first three tokens."""
    T, k, p = setting
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    p1 = _dist(logits[()], T, k, p)
    for a in range(V):
        p2 = _dist(logits[(a,)], T, k, p)
        for b in range(V):
            joint[a, b] = (p1[a] * p2[b]).double() * _dist(logits[(a, b)], T, k, p).double()
    return joint


def speculative_joint(logits, setting, tree_paths, draft: str, seed0: int = 0) -> torch.Tensor:
    """Counts (V, V, V) of the first three tokens of N sequences: the first token drawn as the
    runtime draws it after prefill, then speculative steps over the tree (drafted tokens: a
    random draft's or the oracle's top-k) until three tokens are out."""
    T, k, p = setting
    tree = TreeSpec("t", tuple(tuple(x) for x in tree_paths))
    K, D = tree.top_k, tree.max_depth
    children = torch.full((tree.n_nodes, K), -1)
    for n in range(1, tree.n_nodes):
        children[tree.parent[n], tree.rank[n]] = n
    depth = torch.tensor(tree.depth)
    seed = torch.arange(N) + seed0
    temp, tk, tp = torch.full((N,), T), torch.full((N,), k), torch.full((N,), p)
    table = {c: _dist(lg, T, k, p) for c, lg in logits.items()}
    rand_draft = torch.randn(V, V, generator=torch.Generator().manual_seed(11))

    def probs_of(ctx: list[tuple]) -> torch.Tensor:  # contexts past 3 tokens are never needed
        return torch.stack([table.get(c[:3], table[c[:2]]) for c in ctx])

    x1 = sampling.sample(probs_of([()] * N), sampling.uniform(seed, torch.full((N,), P), 0, sampling.BONUS))
    out = [[int(t)] for t in x1]
    while any(len(o) < 3 for o in out):
        todo = [i for i, o in enumerate(out) if len(o) < 3]
        rows = torch.tensor(todo)
        gen = [out[i] for i in todo]
        tokens = torch.zeros(len(todo), tree.n_nodes, dtype=torch.long)
        tokens[:, 0] = torch.tensor([g[-1] for g in gen])
        ctx = [[tuple(g)] for g in gen]  # per row, per node: the generated tokens up to it
        for n in range(1, tree.n_nodes):
            par = tree.parent[n]
            pc = [c[par] for c in ctx]
            if draft == "random":
                cand = rand_draft[tokens[:, par]].topk(K, -1).indices
            else:  # the oracle: the target's own top-k at the parent
                cand = probs_of(pc).topk(K, -1).indices
            tokens[:, n] = cand[:, tree.rank[n]]
            for c, t in zip(ctx, tokens[:, n].tolist()):
                c.append(c[par] + (t,))
        probs = torch.stack([probs_of(c) for c in zip(*ctx)], 1)  # (B, T, V)
        position = torch.tensor([P + len(g) - 1 for g in gen])  # the root's position
        path, n_acc, bonus = sampling.tree_accept(tokens, probs, children, depth, position,
                                                  seed[rows], D)
        for r, i in enumerate(todo):
            out[i] += tokens[r, path[r, 1:n_acc[r]]].tolist() + [int(bonus[r])]
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    for o in out:
        counts[o[0], o[1], o[2]] += 1
    return counts


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test of counts against probabilities; cells expected below `min_expected` are
    pooled into one (so the chi-square approximation holds)."""
    n = counts.sum()
    exp = (probs * n).flatten()
    obs = counts.flatten()
    small = exp < min_expected
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    obs = torch.cat([obs[~small], obs[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    assert dof >= 1, "one populated cell: nothing to test"
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("draft", ["random", "oracle"])
@pytest.mark.parametrize("tree", list(TREES))
def test_speculative_sampling_is_lossless(tiny_v8, tree, draft, setting):
    s = SETTINGS[setting]
    counts = speculative_joint(tiny_v8, s, TREES[tree], draft)
    pval = chi_square_pvalue(counts, exact_joint(tiny_v8, s))
    # Under the null (the rule is lossless) the p-value is uniform: with the Bonferroni
    # correction the whole family of these tests fails by chance with probability <= ALPHA.
    assert pval > ALPHA / N_TESTS, f"{tree} {draft} {setting}: p = {pval:.2e}"


def test_the_check_rejects_a_rule_without_renormalisation(tiny_v8, monkeypatch):
    """Accepting child j with probability p(c_j) instead of p(c_j) / (1 - sum_{i<j} p(c_i))
    (no renormalisation after a rejection): the bushy tree's second candidates are accepted too
    rarely, and the same test sees it."""
    monkeypatch.setattr(sampling, "_accept_prob", lambda pc: pc)
    s = SETTINGS["T1"]
    counts = speculative_joint(tiny_v8, s, TREES["bushy-2"], "oracle")
    assert chi_square_pvalue(counts, exact_joint(tiny_v8, s)) < 1e-12


def test_warp_matches_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 50, generator=g) * 3
    settings = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 10, 0.8), (1.0, 60, 0.3)]
    temp = torch.tensor([s[0] for s in settings])
    topk = torch.tensor([s[1] for s in settings])
    topp = torch.tensor([s[2] for s in settings])
    got = sampling.warp(x, temp, topk, topp)  # per-row settings in one call
    for i, (T, k, p) in enumerate(settings):
        s = TemperatureLogitsWarper(T)(None, x[i].clone())
        if k:
            s = TopKLogitsWarper(k)(None, s)
        if p < 1:
            s = TopPLogitsWarper(p)(None, s)
        torch.testing.assert_close(got[i], s.softmax(-1), rtol=0, atol=1e-6)


def test_draws_are_counter_based_and_uniform():
    seed = torch.arange(200_000)
    u = sampling.uniform(seed, torch.full_like(seed, 17), 3, sampling.ACCEPT)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    # A pure function of its arguments: the same key gives the same draw, whatever its neighbours.
    again = sampling.uniform(seed.flip(0), torch.full_like(seed, 17), 3, sampling.ACCEPT)
    assert torch.equal(again, u.flip(0))
    for other in (sampling.uniform(seed, torch.full_like(seed, 18), 3, sampling.ACCEPT),
                  sampling.uniform(seed, torch.full_like(seed, 17), 4, sampling.ACCEPT),
                  sampling.uniform(seed, torch.full_like(seed, 17), 3, sampling.BONUS)):
        assert (other != u).float().mean() > 0.999
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01


def test_sample_is_inverse_cdf():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25]]).expand(5, -1) * 2  # unnormalised
    u = torch.tensor([0.0, 0.49, 0.5, 0.74, 0.999], dtype=torch.float64)
    assert sampling.sample(probs, u).tolist() == [1, 1, 3, 3, 4]
    assert math.isclose(float(probs[0].sum()), 2.0)


@pytest.mark.parametrize("block", [16, 4096])
def test_blocked_cumsum_matches_cumsum(monkeypatch, block):
    """The two-level scan equals torch's cumsum (float64 on non-negative and signed inputs,
    lengths that are and are not multiples of the block), and warp, built on it, still
    matches transformers when the vocabulary spans several blocks."""
    monkeypatch.setattr(sampling, "SCAN_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    for V in (block - 1, block, 3 * block + 5, 50_000):
        for x in (torch.rand(3, 2, V, generator=g, dtype=torch.float64),
                  torch.randn(2, V, generator=g, dtype=torch.float64)):
            torch.testing.assert_close(sampling.cumsum(x), x.cumsum(-1), rtol=1e-12, atol=1e-9)
    if block == 16:
        test_warp_matches_transformers()
        probs = torch.rand(4, 1000, generator=g)
        u = torch.rand(4, generator=g, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        want = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        assert torch.equal(sampling.sample(probs, u), want)


def sampled_epilogue(logits, temperature, top_k, top_p, tokens, children, depth, position, seed):
    """The sampling part of the sampled verify graph: warp every node, then tree_accept."""
    probs = sampling.warp(logits, temperature, top_k, top_p)
    return sampling.tree_accept(tokens, probs, children, depth, position, seed, 2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampling_compiles_at_a_large_vocabulary(device):
    """warp + tree_accept through Inductor at a Llama-3 vocabulary (a blocked scan, several
    rows of 128k) give the eager result: on CUDA, torch 2.11's split-scan code generation and
    its searchsorted lowering both failed on the plain formulation."""
    V, B = 128256, 2
    g = torch.Generator().manual_seed(3)
    tree = TreeSpec("bushy-2", TREES["bushy-2"])
    T, children = tree.n_nodes, tree.children_table()
    args = [(torch.randn(B, T, V, generator=g) * 4).to(device), torch.tensor([1.0, 0.7], device=device),
            torch.tensor([0, 50], device=device), torch.tensor([0.9, 1.0], device=device),
            torch.randint(0, V, (B, T), generator=g).to(device), children.to(device),
            torch.as_tensor(tree.depth, dtype=torch.long).to(device), torch.tensor([40, 7], device=device),
            torch.tensor([11, 12], device=device)]
    want = sampled_epilogue(*args)
    got = torch.compile(sampled_epilogue, fullgraph=True, dynamic=False)(*args)
    for w, x in zip(want, got):
        assert torch.equal(w, x)


def _accept_inputs(tree: TreeSpec, B: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(B, tree.n_nodes, V, generator=g) * 3, -1)
    tokens = torch.randint(0, V, (B, tree.n_nodes), generator=g)
    # Drafted tokens the target likes at their parents, so that some rounds accept.
    tokens[:, 1:] = probs.argmax(-1)[:, [tree.parent[n] for n in range(1, tree.n_nodes)]]
    return (tokens, probs, tree.children_table(), torch.tensor(tree.depth),
            torch.randint(0, 100, (B,), generator=g), torch.arange(B) + 1000 * seed)


@pytest.mark.parametrize("paths", [[], [[0]], [[0], [0, 0], [0, 0, 0]], TREES["bushy-2"]],
                         ids=["root-alone", "chain-1", "chain-3", "bushy-2"])
def test_tree_accept_walks_the_trees_levels_then_pads(paths):
    """A tree of depth D in W > D + 1 columns (an engine sized for a deeper tree): walking only
    its D levels and padding gives exactly what walking all W - 1 levels gave (past the leaves
    nothing can be accepted), so the shorter graph changes no output."""
    tree = TreeSpec("t", tuple(tuple(p) for p in paths))
    D, W = tree.max_depth, 6
    accepted = 0
    for seed in range(4):
        args = _accept_inputs(tree, 64, 16, seed)
        path, n_acc, bonus = sampling.tree_accept(*args, D, W)
        walked = sampling.tree_accept(*args, W - 1)  # every column a level, as before
        assert path.shape == (64, W)
        for w, x in zip(walked, (path, n_acc, bonus)):
            assert torch.equal(w, x)
        assert torch.equal(path[:, D + 1:], torch.zeros(64, W - D - 1, dtype=torch.long))
        accepted = max(accepted, int(n_acc.max()))
    assert accepted == D + 1, "no row accepted the whole tree depth: the test would prove little"
    with pytest.raises(ValueError, match="width 2 < tree depth"):
        sampling.tree_accept(*_accept_inputs(TreeSpec("c", ((0,), (0, 0))), 2, 16, 0), 2, 2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_root_alone_sampled_acceptance_compiles(device):
    """Plain decoding's sampled acceptance in a speculating engine (the root alone, padded to
    the engine's 6 columns) through Inductor at SmolLM2's vocabulary gives the eager result.
    It once walked 5 rounds over the root alone; that verify graph never finished lowering on
    an H200 (measured dispatch's `verify_sampled (plain)`)."""
    V, B, W = 49152, 2, 6
    tree = TreeSpec("chain-0", ())
    g = torch.Generator().manual_seed(5)

    def epilogue(logits, temperature, top_k, top_p, tokens, children, depth, position, seed):
        probs = sampling.warp(logits, temperature, top_k, top_p)
        return sampling.tree_accept(tokens, probs, children, depth, position, seed, 0, W)

    args = [(torch.randn(B, 1, V, generator=g) * 4).to(device), torch.tensor([1.0, 0.7], device=device),
            torch.tensor([0, 50], device=device), torch.tensor([0.9, 1.0], device=device),
            torch.randint(0, V, (B, 1), generator=g).to(device), tree.children_table().to(device),
            torch.as_tensor(tree.depth, dtype=torch.long).to(device), torch.tensor([40, 7], device=device),
            torch.tensor([11, 12], device=device)]
    want = epilogue(*args)
    got = torch.compile(epilogue, fullgraph=True, dynamic=False)(*args)
    assert want[0].shape == (B, W)
    for w, x in zip(want, got):
        assert torch.equal(w, x)
