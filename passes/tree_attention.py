"""Causal SDPA over [cache | new] -> two-pass tree attention (`spec::tree_attention`).

Before:  k_all = scatter(k_cache, 2, slots(cache_len, T), k_new)        # same for v
         o = sdpa(q, k_all, v_all, attn_mask=causal_over_slots(cache_len, T))
After:   o = tree_attention(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale)
         (k_all stays only as the new cache value; static_kv_cache later makes it in place)

With a tree: `tree_mask` is the tree's static (T, T) ancestor mask and the block's rotary
positions become `cache_len + depth` (the `input_pos` input disappears). A chain tree gives the
causal mask and positions cache_len + [0, T), i.e. exactly the unrewritten graph (prefill).
Without a tree (a block whose length is only known later, the draft level graph that
unroll_draft instantiates) the mask is the causal one, built in the graph from the block length.
Requires: placeholders `cache_len` (and `input_pos` when a tree is given). Required: raises if
no SDPA matches.
"""

from __future__ import annotations

import math

import torch
from torch import fx

import spec_compiler.ops.tree_attention  # noqa: F401  (registers torch.ops.spec.tree_attention)
from spec_compiler.trees import TreeSpec

from .infra import aten, finish, placeholders, record, register_constant, remove_placeholder, require

SDPA = aten.scaled_dot_product_attention.default


def tree_attention(gm: fx.GraphModule, *, tree: TreeSpec | None) -> fx.GraphModule:
    ph = placeholders(gm)
    cache_len = ph["cache_len"]
    count, mask = 0, None
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target != SDPA:
            continue
        q, k_all, v_all = n.args[:3]
        if not (_is_cache_write(k_all) and _is_cache_write(v_all)):
            continue
        if mask is None:
            mask = _mask_node(gm, tree, q)
        scale = n.kwargs.get("scale") or 1.0 / math.sqrt(q.meta["val"].shape[-1])
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(
                torch.ops.spec.tree_attention.default,
                (q, k_all.args[0], v_all.args[0], k_all.args[3], v_all.args[3], cache_len, mask,
                 float(scale)))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        count += 1
    require("tree_attention", count, "one causal SDPA over [cache | new] per layer")
    if tree is not None and "input_pos" in ph:
        _tree_positions(gm, tree, ph["input_pos"], cache_len)
    record(gm, "tree_attention", count)
    return finish(gm)


def _is_cache_write(n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.scatter.src
            and n.args[0].op == "placeholder" and n.args[1] == 2)


def _mask_node(gm: fx.GraphModule, tree: TreeSpec | None, q: fx.Node) -> fx.Node:
    if tree is not None:
        return register_constant(gm, f"tree_mask_{tree.n_nodes}", tree.tree_mask())
    g = gm.graph
    with g.inserting_before(q.next):  # causal (T, T) from the block length T = q.shape[2]
        t = g.call_function(aten.sym_size.int, (q, 2))
        ar = g.call_function(aten.arange.default, (t,), {"device": q.meta["val"].device})
        rows = g.call_function(aten.unsqueeze.default, (ar, 1))
        cols = g.call_function(aten.unsqueeze.default, (ar, 0))
        return g.call_function(aten.ge.Tensor, (rows, cols))


def _tree_positions(gm: fx.GraphModule, tree: TreeSpec, input_pos: fx.Node, cache_len: fx.Node):
    """input_pos -> cache_len[:, None] + depth (the rotary position of a node is its depth)."""
    depth = register_constant(gm, f"tree_depth_{tree.n_nodes}",
                              torch.tensor(tree.depth, dtype=torch.long))
    with gm.graph.inserting_before(depth.next):
        col = gm.graph.call_function(aten.unsqueeze.default, (cache_len, 1))
        pos = gm.graph.call_function(aten.add.Tensor, (col, depth))
    input_pos.replace_all_uses_with(pos)
    remove_placeholder(gm, "input_pos")
