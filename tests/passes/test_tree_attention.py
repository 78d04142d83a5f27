"""tree_attention: causal SDPA over [cache | block] -> spec::tree_attention with a static tree mask.

Chain tree: the same function as the unrewritten (causal) graph. Bushy tree: node n sees exactly
its ancestors, at rotary position cache_len + depth(n). No tree: causal over a block whose length
is only known at run time.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

from pass_utils import C, apply, cache_names, call, close, config, eager, random_inputs, traced
from spec_compiler.passes import cleanup, fuse_projections, tree_attention
from spec_compiler.passes.infra import aten, count_ops, placeholders
from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import chain

SDPA, TREE_ATTN = aten.scaled_dot_product_attention.default, torch.ops.spec.tree_attention.default


def _rewrite(gm, tree):
    return apply(gm, cleanup, fuse_projections, lambda g: tree_attention(g, tree=tree))


def _check_shape(gm, n_layers: int, has_input_pos: bool):
    assert count_ops(gm, SDPA) == 0
    assert count_ops(gm, TREE_ATTN) == n_layers == gm.meta["pass_counts"]["tree_attention"]
    assert ("input_pos" in placeholders(gm)) == has_input_pos
    FileCheck().check_not("scaled_dot_product_attention").check_count(
        "spec.tree_attention", n_layers, exactly=True).run(str(gm.graph))


def test_chain_tree_equals_unrewritten_graph(target, draft):
    cfg = config(target, draft, chain(4))
    ref_gm = traced(cfg, "prefill", target)
    gm = _rewrite(traced(cfg, "prefill", target), chain(C - 1))
    _check_shape(gm, target.cfg.n_layers, has_input_pos=False)
    assert torch.equal(getattr(gm, f"tree_mask_{C}"), torch.ones(C, C, dtype=torch.bool).tril())
    for seed in (0, 1):
        x = random_inputs(cfg, "prefill", seed)  # input_pos = cache_len + [0, C): chain depths
        out, ref = call(gm, x), call(ref_gm, x)
        assert list(out) == list(ref) == ["logits", "hidden", *cache_names(gm)]
        for k in ref:
            close(out[k], ref[k], k)


def test_bushy_tree_node_sees_exactly_its_ancestors(target, draft, bushy):
    """logits[n] == eager Llama run causally on the path root..n alone at cache_len + [0, depth]."""
    cfg = config(target, draft, bushy)
    gm = _rewrite(traced(cfg, "verify", target), bushy)
    _check_shape(gm, target.cfg.n_layers, has_input_pos=False)
    x = random_inputs(cfg, "verify", seed=2)
    out = call(gm, x)
    caches = [x[k] for k in cache_names(gm)]
    tokens, cache_len = x["tokens"], x["cache_len"]
    B = tokens.shape[0]
    for n in range(bushy.n_nodes):
        path = bushy.ancestors(n)  # root .. n
        pos = cache_len[:, None] + torch.arange(len(path))
        logits, hidden, kv = eager(target, tokens[:, path], pos, cache_len, caches)
        close(out["logits"][:, n], logits[:, -1], f"node {n}")
        close(out["hidden"][:, n], hidden[:, -1], f"node {n}")
        for name, ref in zip(cache_names(gm), kv):  # node n's K/V: tree slot n, path slot depth
            for b in range(B):
                c = int(cache_len[b])
                close(out[name][b, :, c + n], ref[b, :, c + len(path) - 1], f"{name} node {n}")
    for name in cache_names(gm):
        for b in range(B):
            c = int(cache_len[b])
            end = c + bushy.n_nodes
            assert torch.equal(out[name][b, :, :c], x[name][b, :, :c])  # the prefix is untouched
            assert torch.equal(out[name][b, :, end:], x[name][b, :, end:])


def test_no_tree_is_causal_at_any_block_length(target, draft, bushy):
    cfg = config(target, draft, bushy)
    ref_gm = traced(cfg, "draft", draft)  # dynamic T, as the pipeline traces 'draft'
    gm = _rewrite(traced(cfg, "draft", draft), None)
    _check_shape(gm, draft.cfg.n_layers, has_input_pos=True)
    FileCheck().check("sym_size").check("arange").check("ge").run(str(gm.graph))
    for seed, T in ((3, 3), (4, 6)):
        x = random_inputs(cfg, "draft", seed, T=T)
        out, ref = call(gm, x), call(ref_gm, x)
        assert out["logits"].shape[1] == T
        for k in ref:
            close(out[k], ref[k], f"{k} T={T}")


@pytest.mark.parametrize("tree", [None, chain(C - 1)], ids=["no_tree", "chain"])
def test_tree_attention_requires_a_match(target, draft, tree):
    graph = "draft_prefill" if tree is not None else "draft"
    gm = _rewrite(traced(config(target, draft, chain(4)), graph, draft), tree)
    n = len(gm.graph.nodes)
    with pytest.raises(SpecCompileError, match="tree_attention: 0 matches"):
        tree_attention(gm, tree=tree)  # a second run: no causal SDPA left to rewrite
    assert len(gm.graph.nodes) == n
