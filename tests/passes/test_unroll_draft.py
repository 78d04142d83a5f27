"""unroll_draft: one draft forward -> the whole draft step (EAGLE catch-up + the tree's levels).

Reference: plain eager EagleDraft calls. Catch-up runs the n_acc accepted pairs at positions
cache_len - n_acc + [0, n_acc). Then, node by node (parents first), a node's token is its
parent's top-k at the node's rank, and a node with children is forwarded by running the draft
causally over the pairs of its path root..node alone (the catch-up cache as prefix) at
positions cache_len + depth - 1: its output feature and logits are the last row. With a reduced
draft vocabulary the top-k is over the hot columns, mapped to target ids (`hot_ids[column]`).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.testing import FileCheck

from pass_utils import (apply, cache_names, call, close, config, draft_step_inputs, eager, exact,
                        traced)
from spec_compiler.passes import cleanup, fuse_projections, tree_attention, unroll_draft
from spec_compiler.passes.infra import aten, count_ops, placeholders
from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import TreeSpec, chain

TREE_ATTN = torch.ops.spec.tree_attention.default


def draft_step_reference(draft, tree: TreeSpec, x: dict, b: int):
    """Row b: (tree tokens, draft caches after the catch-up) by eager EagleDraft calls."""
    n_acc, cache_len = int(x["n_acc"][b]), x["cache_len"][b:b + 1]  # cache_len: (1,)
    caches = [x[k][b:b + 1] for k in cache_names(list(x))]
    base = cache_len - n_acc
    logits, feats, caches = eager(draft, x["acc_tokens"][b:b + 1, :n_acc],
                                  base[:, None] + torch.arange(n_acc), base, caches,
                                  x["acc_feats"][b:b + 1, :n_acc])
    token = {0: int(x["acc_tokens"][b, n_acc - 1])}  # the root: the last accepted token
    out_logits, out_feat = {0: logits[0, -1]}, {0: feats[0, -1]}
    has_child = set(tree.parent[1:])
    for n in range(1, tree.n_nodes):  # node order is by depth: parents come first
        p = tree.parent[n]
        token[n] = int(draft.token_ids(out_logits[p].topk(tree.top_k).indices[tree.rank[n]]))
        if n not in has_child:
            continue
        path = tree.ancestors(n)[1:]  # drafted nodes a_1 .. a_d = n; the root is in the cache
        toks = torch.tensor([[token[a] for a in path]])  # (1, d)
        fin = torch.stack([out_feat[tree.parent[a]] for a in path])[None]  # (1, d, H)
        pos = cache_len[:, None] + torch.arange(len(path))  # depth - 1
        lg, ft, _ = eager(draft, toks, pos, cache_len, caches, fin)
        out_logits[n], out_feat[n] = lg[0, -1], ft[0, -1]
    return [token[n] for n in range(tree.n_nodes)], caches


def _unrolled(target, draft, tree):
    cfg = config(target, draft, tree)
    gm = apply(traced(cfg, "draft", draft), cleanup, fuse_projections,
               partial(tree_attention, tree=None), partial(unroll_draft, tree=tree))
    return cfg, gm


@pytest.mark.parametrize("vocab", ["full", "hot"])
@pytest.mark.parametrize("tree", [chain(3), "mc_sim_7b_63"], ids=["chain-3", "mc_sim_7b_63"])
def test_unroll_draft_matches_eager_step(request, target, bushy, tree, vocab):
    tree = bushy if tree == "mc_sim_7b_63" else tree
    draft = request.getfixturevalue("draft" if vocab == "full" else "hot_draft")
    cfg, gm = _unrolled(target, draft, tree)
    n_layers = len(draft.layers)
    # Shape: catch-up + one forward per level that has children; top-k per drafted level.
    n_fwd = 1 + len({tree.depth[p] for p in tree.parent[1:] if p != 0})
    assert gm.meta["pass_counts"]["unroll_draft"] == n_fwd
    assert count_ops(gm, TREE_ATTN) == n_fwd * n_layers
    assert count_ops(gm, aten.topk.default) == tree.max_depth
    assert list(placeholders(gm)) == ["acc_tokens", "acc_feats", "n_acc", "cache_len",
                                      *cache_names(gm)]
    assert gm.meta["output_names"] == ["tree_tokens", *cache_names(gm)]
    FileCheck().check("spec.tree_attention").check("aten.topk").check("spec.tree_attention") \
        .check("aten.cat").run(str(gm.graph))
    hot = draft.hot_ids
    # A hot draft maps each level's picked columns through its ids (lifted later as a weight).
    assert count_ops(gm, aten.index.Tensor) == (tree.max_depth if hot is not None else 0)
    assert gm.meta.get("weight_buffers", []) == ([] if hot is None else ["hot_ids"])

    drafted = []
    for seed, n_acc in ((0, [1, 1]), (1, [3, 3]), (2, [1, 3]), (3, [3, 1])):
        x = draft_step_inputs(cfg, seed, n_acc)
        out = call(gm, x)
        assert out["tree_tokens"].shape == (cfg.batch_size, tree.n_nodes)
        for b in range(cfg.batch_size):
            tokens, caches = draft_step_reference(draft, tree, x, b)
            assert out["tree_tokens"][b].tolist() == tokens, f"seed {seed} row {b}"
            drafted += tokens[1:]
            c, n = int(x["cache_len"][b]), n_acc[b]
            for k, ref in zip(cache_names(gm), caches, strict=True):
                # the catch-up pairs' K/V at slots cache_len - n_acc .. cache_len - 1
                close(out[k][b, :, c - n:c], ref[0, :, c - n:c], f"{k} row {b} catch-up")
                exact(out[k][b, :, :c - n], x[k][b, :, :c - n], f"{k} row {b} untouched")
    if hot is not None:  # drafted tokens are target ids of the hot set, not column indices
        assert set(drafted) <= set(hot.tolist())
        assert max(drafted) >= len(hot), "every drafted id is also a column index"


def test_draft_attention_calls_stay_within_the_tree(target, draft, bushy):
    """spec_compiler/kernels/limits.py bounds only the tree's node count (and the prefill chunk):
    that covers the draft because its tree_attention calls are (T queries, Tk suffix keys) =
    (depth + 1, depth + 1) for the catch-up, then per level its forwarded nodes over every
    forwarded node so far (root excluded), all below the tree's node count."""
    from torch.fx.passes.shape_prop import ShapeProp

    from spec_compiler.trace import input_names

    cfg, gm = _unrolled(target, draft, bushy)
    x = draft_step_inputs(cfg, 0, [1, 1])
    ShapeProp(gm).propagate(*[x[n] for n in input_names(gm)])
    calls = [(a.args[0].meta["tensor_meta"].shape[2], a.args[3].meta["tensor_meta"].shape[2])
             for a in gm.graph.nodes if a.target == TREE_ATTN]
    has_child = set(bushy.parent[1:])
    want, n_forwarded = [(bushy.max_depth + 1,) * 2], 0
    for d in range(1, bushy.max_depth + 1):
        n_fwd = sum(n in has_child for n in bushy.level_nodes(d))
        n_forwarded += n_fwd
        want += [(n_fwd, n_forwarded)] if n_fwd else []
    assert calls == [c for c in want for _ in draft.layers], calls
    assert max(tk for _, tk in calls) < bushy.n_nodes


def test_unroll_draft_top_k_larger_than_draft_vocab(tiny_hot_draft_dir, target, bushy):
    from spec_compiler.loading import load_draft

    small = load_draft(tiny_hot_draft_dir, target, draft_vocab=3)  # top-k of mc_sim_7b_63 is 4
    cfg = config(target, small, chain(3))  # chain: top-1 fits
    gm = apply(traced(cfg, "draft", small), cleanup, fuse_projections, partial(tree_attention, tree=None))
    with pytest.raises(SpecCompileError, match="scores 3 tokens, fewer than tree 'mc_sim_7b_63'"):
        unroll_draft(gm, tree=bushy)
    with pytest.raises(SpecCompileError, match="--draft-vocab 3 is smaller than"):
        config(target, small, bushy)


def test_unroll_draft_requires_tree_attention(target, draft, bushy):
    cfg = config(target, draft, bushy)
    gm = apply(traced(cfg, "draft", draft), cleanup, fuse_projections)  # still causal SDPA
    n = len(gm.graph.nodes)
    with pytest.raises(SpecCompileError, match="unroll_draft: 0 matches"):
        unroll_draft(gm, tree=bushy)
    assert len(gm.graph.nodes) == n


@pytest.fixture(scope="module")
def eagle3_draft(target):
    """A random EAGLE-3 head over the tiny target: fc from three fused layers (3 x hidden), the
    midlayer attending over [embedding ; feature], its own norm and full-vocabulary lm_head."""
    import dataclasses

    from spec_compiler.config import Eagle3Config
    from spec_compiler.models.eagle3 import Eagle3Draft

    cfg = Eagle3Config(layer=dataclasses.replace(target.cfg, n_layers=1), target_hidden_size=target.cfg.hidden_size,
                       aux_layers=(0, 1, 2), has_embed=False)
    torch.manual_seed(4)
    d = Eagle3Draft(cfg, target.cfg)
    for p in d.parameters():
        p.data.normal_(0, 0.3)
    d.embed_tokens.weight = target.embed_tokens.weight
    return d.eval()


@pytest.mark.parametrize("tree", [chain(3), "mc_sim_7b_63"], ids=["chain-3", "mc_sim_7b_63"])
def test_unroll_eagle3_draft_matches_eager_step(target, bushy, eagle3_draft, tree):
    """EAGLE-3: the catch-up projects the target's fused features (3 x hidden) through fc, the
    levels feed the draft's own hidden-wide features (the one-level graph has no fc); the step
    equals eager Eagle3Draft calls, which pick the branch by the feature width."""
    tree = bushy if tree == "mc_sim_7b_63" else tree
    cfg = config(target, eagle3_draft, tree)
    gm = apply(traced(cfg, "draft", eagle3_draft), cleanup, fuse_projections, partial(tree_attention, tree=None),
               partial(unroll_draft, tree=tree, project=eagle3_draft.fc))
    H = target.cfg.hidden_size
    assert placeholders(gm)["acc_feats"].meta["val"].shape[-1] == 3 * H
    fc = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc.weight"]
    assert len(fc) == 1 and count_ops(gm, aten.topk.default) == tree.max_depth  # fc once: the catch-up
    for seed, n_acc in ((0, [1, 1]), (1, [3, 3]), (2, [1, 3])):
        x = draft_step_inputs(cfg, seed, n_acc)
        assert x["acc_feats"].shape[-1] == 3 * H
        out = call(gm, x)
        for b in range(cfg.batch_size):
            tokens, caches = draft_step_reference(eagle3_draft, tree, x, b)
            assert out["tree_tokens"][b].tolist() == tokens, f"seed {seed} row {b}"
            c, n = int(x["cache_len"][b]), n_acc[b]
            for k, ref in zip(cache_names(gm), caches, strict=True):
                close(out[k][b, :, c - n:c], ref[0, :, c - n:c], f"{k} row {b} catch-up")
