"""Causal SDPA over [cache | new] -> two-pass tree attention (`spec::tree_attention`).

Before (`models.llama.cache_attention`, matched whole, as traced from the model's own code):
         k_all = scatter(k_cache, 2, slots(cache_len, T), k_new)        # same for v
         o = sdpa(q, k_all, v_all, attn_mask=causal_slot_mask(cache_len, T, S))
After:   o = tree_attention(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale)
         (k_all stays only as the new cache value; static_kv_cache later makes it in place)

Only that pattern is rewritten: an SDPA with any other mask (sliding window, non-causal, an extra
additive term, a mask over another cache length or another cache_len), another scale, dropout,
or K/V that are not this block's cache writes is left alone. The block length T and capacity S
are free in the pattern (literal in static graphs, a size node in the draft's dynamic one) and
checked against q and the cache.

With a tree: `tree_mask` is the tree's static (T, T) ancestor mask and the block's rotary
positions become `cache_len + depth` (the `input_pos` input disappears). A chain tree gives the
causal mask and positions cache_len + [0, T), i.e. exactly the unrewritten graph (prefill).
Without a tree (a block whose length is only known later, the draft level graph that
unroll_draft instantiates) the mask is the causal one, built in the graph from the block length.
Requires: placeholders `cache_len` (and `input_pos` when a tree is given). Required: raises if
no SDPA matches.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import spec_compiler.ops.tree_attention  # noqa: F401  (registers torch.ops.spec.tree_attention)
from spec_compiler.models.llama import cache_attention
from spec_compiler.trees import TreeSpec

from .cleanup import cleanup
from .infra import (call_traced, finish, match_pattern, placeholders, record, register_constant,
                    remove_placeholder, require, trace_pattern)

TREE_ATTN = torch.ops.spec.tree_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def tree_attention(gm: fx.GraphModule, *, tree: TreeSpec | None) -> fx.GraphModule:
    ph = placeholders(gm)
    cache_len = ph["cache_len"]
    count, mask = 0, None
    for sdpa, m in _matches(gm).items():
        q = m["q"]
        if mask is None:
            mask = _mask_node(gm, tree, q)
        scale = 1.0 / math.sqrt(q.meta["val"].shape[-1])  # the pattern's SDPA has the default scale
        with gm.graph.inserting_before(sdpa):
            new = gm.graph.call_function(
                TREE_ATTN, (q, m["k_cache"], m["v_cache"], m["k"], m["v"], m["cache_len"], mask, scale))
        new.meta = dict(sdpa.meta)
        sdpa.replace_all_uses_with(new)
        gm.graph.erase_node(sdpa)
        count += 1
    require("tree_attention", count, "one causal SDPA over [cache | new] per layer")
    if tree is not None and "input_pos" in ph:
        _tree_positions(gm, tree, ph["input_pos"], cache_len)
    record(gm, "tree_attention", count)
    return finish(gm)


def _matches(gm: fx.GraphModule) -> dict[fx.Node, dict]:
    """SDPA node -> the bindings of `cache_attention` around it, for every SDPA that is exactly
    that pattern (one pattern per q/cache shape signature, matched over the graph once)."""
    keys = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != SDPA or len(n.args) < 2:
            continue
        q, k_all = n.args[:2]
        k_cache = k_all.args[0] if isinstance(k_all, fx.Node) and k_all.args else None
        vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in (q, k_cache)]
        if all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals):
            qv, cv = vals
            keys.setdefault((qv.shape[0], qv.shape[1], qv.shape[3], cv.shape[1], qv.dtype,
                             qv.device), []).append(n)
    found = {}
    for key, nodes in keys.items():
        for m in match_pattern(gm, _pattern(*key)):
            sdpa = m["_out"][0]
            if sdpa in nodes and _sizes_ok(m):
                found[sdpa] = m
    return found


def _sizes_ok(m: dict) -> bool:
    """The free sizes are this block's length and this cache's capacity."""
    q, k, c = (m[n].meta["val"] for n in ("q", "k", "k_cache"))
    T, S = m.get("T"), m.get("S")
    return _same(T, q.shape[2]) and _same(T, k.shape[2]) and _same(S, c.shape[2])


def _same(bound, size) -> bool:
    if isinstance(bound, fx.Node):
        bound = bound.meta.get("val")
    return bound is not None and statically_known_true(bound == size)


@functools.lru_cache(maxsize=None)
def _pattern(B: int, Hq: int, Dh: int, Hkv: int, dtype: torch.dtype,
             device: torch.device) -> fx.GraphModule:
    """`cache_attention` traced for q (B, Hq, T, Dh) and caches (B, Hkv, S, Dh), T and S free."""
    T, S = 3, 11  # any sizes: they become placeholders
    q = torch.zeros(B, Hq, T, Dh, dtype=dtype)
    k = torch.zeros(B, Hkv, T, Dh, dtype=dtype)
    c = torch.zeros(B, Hkv, S, Dh, dtype=dtype)
    cache_len = torch.zeros(B, dtype=torch.long)
    return trace_pattern(cache_attention, (q, k, k.clone(), c, c.clone(), cache_len),
                         ("q", "k", "v", "k_cache", "v_cache", "cache_len"),
                         {"T": [(0, 2), (1, 2), (2, 2)], "S": [(3, 2), (4, 2)]},
                         normalize=cleanup, device=device)


def _mask_node(gm: fx.GraphModule, tree: TreeSpec | None, q: fx.Node) -> fx.Node:
    if tree is not None:
        return register_constant(gm, f"tree_mask_{tree.n_nodes}",
                                 tree.tree_mask().to(q.meta["val"].device))
    with gm.graph.inserting_before(q.next):  # causal (T, T) from the block length T = q.shape[2]
        return call_traced(gm, _causal_mask, q)


def _causal_mask(q: torch.Tensor) -> torch.Tensor:
    T = q.shape[2]
    return torch.ones(T, T, dtype=torch.bool, device=q.device).tril()


def _tree_positions(gm: fx.GraphModule, tree: TreeSpec, input_pos: fx.Node, cache_len: fx.Node):
    """input_pos -> cache_len[:, None] + depth (the rotary position of a node is its depth)."""
    depth = register_constant(gm, f"tree_depth_{tree.n_nodes}",
                              torch.tensor(tree.depth, dtype=torch.long,
                                           device=cache_len.meta["val"].device))
    with gm.graph.inserting_before(depth.next):
        pos = call_traced(gm, lambda c, d: c[:, None] + d, cache_len, depth)
    input_pos.replace_all_uses_with(pos)
    remove_placeholder(gm, "input_pos")
