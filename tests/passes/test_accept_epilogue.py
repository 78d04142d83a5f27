"""accept_epilogue: greedy tree acceptance, emitted tokens/features and KV compaction in-graph.

Reference: a plain-Python walk over the outputs of the unrewritten verify graph (the graph
accept_epilogue receives: target over the tree, every tree node's K/V at slot cache_len + node).
"""

from __future__ import annotations

import functools
from functools import partial

import pytest
import torch
from torch.testing import FileCheck

from pass_utils import apply, cache_names, call, config, copy_graph, exact, random_inputs, traced
from spec_compiler.passes import accept_epilogue, cleanup, fuse_projections, static_kv_cache, tree_attention
from spec_compiler.passes.infra import aten, count_ops
from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import TreeSpec


def greedy_accept(tree: TreeSpec, tokens: list[int], target_next: list[int]):
    """(accepted nodes root first, the chosen leaf path): from the root, follow a child whose token
    is the target's argmax at its parent; the longest such path, ties to the first in
    tree.leaf_paths() order."""
    best: list[int] = []
    chosen: list[int] = []
    for leaf_path in tree.leaf_paths().tolist():
        path = [n for n in leaf_path if n >= 0]
        n = 1
        while n < len(path) and tokens[path[n]] == target_next[path[n - 1]]:
            n += 1
        if n > len(best):
            best, chosen = path[:n], leaf_path
    return best, chosen


@functools.lru_cache(maxsize=None)  # calls don't mutate them (no static_kv_cache): share per tree
def _verify_graphs(target, draft, tree, sampling=False):
    """(unrewritten verify graph, the same with accept_epilogue; with sampling: verify_sampled's)."""
    cfg = config(target, draft, tree)
    pre = apply(traced(cfg, "verify", target), cleanup, fuse_projections,
                partial(tree_attention, tree=tree))
    return cfg, pre, apply(copy_graph(pre), partial(accept_epilogue, tree=tree, sampling=sampling))


def _force(tree: TreeSpec, pre, x, last: list[int], vocab: int) -> torch.Tensor:
    """Tokens under which row b accepts exactly the path root..last[b]: level by level, nodes on
    that path copy the target's argmax at their parent, every other node differs from it."""
    tokens = x["tokens"].clone()
    for d in range(1, tree.max_depth + 1):
        target_next = call(pre, {**x, "tokens": tokens})["logits"].argmax(-1)  # (B, T)
        for b, m in enumerate(last):
            on_path = tree.ancestors(m)
            for n in tree.level_nodes(d):
                want = target_next[b, tree.parent[n]]
                if n in on_path:
                    tokens[b, n] = want
                elif tokens[b, n] == want:
                    tokens[b, n] = (want + 1) % vocab
    return tokens


def _check(tree: TreeSpec, pre, gm, x, expect_paths=None):
    ref = call(pre, x)  # logits, hidden, caches with every tree node at slot cache_len + node
    out = call(gm, x)
    target_next = ref["logits"].argmax(-1)
    D = tree.max_depth
    for b in range(x["tokens"].shape[0]):
        path, leaf_path = greedy_accept(tree, x["tokens"][b].tolist(), target_next[b].tolist())
        if expect_paths is not None:
            assert path == expect_paths[b], (b, path, expect_paths[b])
        n, c = len(path), int(x["cache_len"][b])
        assert int(out["n_acc"][b]) == n
        assert int(out["cache_len"][b]) == c + n
        assert out["acc_tokens"][b, :n].tolist() == target_next[b, path].tolist()
        # Past n_acc is padding; it is where the tie rule shows (tied paths agree on their
        # accepted prefix): the chosen leaf path's target tokens, -1 entries read as the root.
        pad = [max(p, 0) for p in leaf_path[n:]]
        assert out["acc_tokens"][b, n:].tolist() == target_next[b, pad].tolist(), "tie rule"
        exact(out["acc_feats"][b, :n], ref["hidden"][b, path], f"acc_feats row {b}")
        for k in cache_names(gm):
            exact(out[k][b, :, c:c + n], ref[k][b, :, [c + p for p in path]], f"{k} row {b}")
            exact(out[k][b, :, :c], x[k][b, :, :c], f"{k} row {b} prefix")
            exact(out[k][b, :, c + D + 1:], x[k][b, :, c + D + 1:], f"{k} row {b} past the path")
    return out


def _check_shape(gm, n_caches: int):
    assert gm.meta["output_names"] == ["acc_tokens", "acc_feats", "n_acc", "cache_len",
                                       *cache_names(gm)]
    assert gm.meta["pass_counts"]["accept_epilogue"] == n_caches + 1
    writes = [n for n in gm.graph.nodes if n.target == aten.scatter.src and n.args[0].op == "placeholder"]
    assert len(writes) == n_caches  # only the compacted cache writes remain
    assert count_ops(gm, aten.cumprod.default) == 1
    FileCheck().check("aten.argmax").check("aten.cumprod").check("aten.argmax") \
        .check("aten.scatter.src").run(str(gm.graph))


@pytest.mark.parametrize("tree_name", ["chain4", "bushy"])
def test_accept_random_tokens(target, draft, tree_name, request):
    tree = request.getfixturevalue(tree_name)
    cfg, pre, gm = _verify_graphs(target, draft, tree)
    _check_shape(gm, len(cache_names(gm)))
    for seed in (0, 1, 2):
        _check(tree, pre, gm, random_inputs(cfg, "verify", seed))


@pytest.mark.parametrize("tree_name, last", [
    ("chain4", [(), (0, 0, 0, 0)]),          # nothing accepted / everything accepted
    ("chain4", [(0, 0), (0,)]),
    ("bushy", [(3,), (0, 0, 0, 0, 1)]),      # the rank-3 child / a deepest leaf (depth 5)
    ("bushy", [(2, 1), (0, 2, 1)]),          # depth 2 / depth 3, off the top-1 spine
    ("bushy", [(0, 0, 0, 0), ()]),           # depth 4, internal (two leaf paths tie) / root only
], ids=["chain-none-all", "chain-2-1", "bushy-d1-d5", "bushy-d2-d3", "bushy-d4-root"])
def test_accept_constructed_paths(target, draft, request, tree_name, last):
    tree = request.getfixturevalue(tree_name)
    last = [tree.paths.index(p) + 1 if p else 0 for p in last]  # rank paths -> node ids
    cfg, pre, gm = _verify_graphs(target, draft, tree)
    x = random_inputs(cfg, "verify", seed=sum(last))
    x["tokens"] = _force(tree, pre, x, last, cfg.model.vocab_size)
    out = _check(tree, pre, gm, x, expect_paths=[tree.ancestors(m) for m in last])
    for b, m in enumerate(last):
        assert int(out["n_acc"][b]) == tree.depth[m] + 1


def test_accept_epilogue_requires_a_cache_write(target, draft, bushy):
    _, pre, _ = _verify_graphs(target, draft, bushy)
    gm = apply(copy_graph(pre), static_kv_cache)  # caches written in place: nothing to compact
    with pytest.raises(SpecCompileError, match="accept_epilogue: 0 matches"):
        accept_epilogue(gm, tree=bushy)


@pytest.mark.parametrize("tree_name", ["chain4", "bushy"])
def test_sampled_rows_are_speculative_sampling_greedy_rows_unchanged(target, draft, tree_name, request):
    """Row 0 greedy, row 1 at temperature 0.8 / top-p 0.9: the graph's outputs are, exactly, the
    greedy walk for row 0 and `sampling.tree_accept` on the unrewritten graph's logits for row 1
    (emitted = the accepted path's drafted tokens, then the bonus; compaction along that path)."""
    from spec_compiler import sampling

    tree = request.getfixturevalue(tree_name)
    cfg, pre, gm = _verify_graphs(target, draft, tree, sampling=True)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][-4:] == \
        ["temperature", "top_p", "top_k", "seed"]
    assert "temperature" not in [n.target for n in _verify_graphs(target, draft, tree)[2].graph.nodes]
    accepted = []
    for seed in (0, 1, 2, 3):
        x = random_inputs(cfg, "verify", seed)
        ref = call(pre, x)
        # Draft tokens the target likes, so that sampling accepts some of them.
        x["tokens"][:, 1:] = ref["logits"].argmax(-1)[:, [tree.parent[n] for n in range(1, tree.n_nodes)]]
        ref = call(pre, x)
        x.update(temperature=torch.tensor([0.0, 0.8]), top_p=torch.tensor([1.0, 0.9]),
                 top_k=torch.tensor([0, 0]), seed=torch.tensor([0, 1000 + seed]))
        out = call(gm, x)
        greedy = _check(tree, pre, gm, {**x, "temperature": torch.zeros(2)})  # greedy rows: as verify
        for k in ("acc_tokens", "acc_feats", "n_acc", "cache_len"):
            exact(out[k][0], greedy[k][0], f"greedy row: {k}")
        probs = sampling.warp(ref["logits"][1:], x["temperature"][1:], x["top_k"][1:], x["top_p"][1:])
        path, n_acc, bonus = sampling.tree_accept(x["tokens"][1:], probs, tree.children_table(),
                                                  torch.tensor(tree.depth), x["cache_len"][1:],
                                                  x["seed"][1:], tree.max_depth)
        n, c = int(n_acc[0]), int(x["cache_len"][1])
        p = path[0, :n].tolist()
        assert int(out["n_acc"][1]) == n and int(out["cache_len"][1]) == c + n
        assert out["acc_tokens"][1, :n].tolist() == x["tokens"][1, p[1:]].tolist() + [int(bonus[0])]
        exact(out["acc_feats"][1, :n], ref["hidden"][1, p], "sampled row: acc_feats")
        for k in cache_names(gm):
            exact(out[k][1, :, c:c + n], ref[k][1, :, [c + q for q in p]], f"{k} sampled row")
        accepted.append(n)
    assert max(accepted) > 1, "no drafted token was accepted: the test would prove little"
