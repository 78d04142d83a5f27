"""One draft forward -> the whole draft step: EAGLE catch-up + the tree's levels, straight-line.

Before (one level, block length T symbolic):
    logits, feat, k' = draft(tokens, features, input_pos, cache_len, k)     # causal tree_attention
After (static, for a tree of depth D, top-k K):
    catch-up: draft(acc_tokens, acc_feats, base + [0, D], base, k)          # base = cache_len - n_acc
              -> the root's draft logits/feature = row n_acc - 1; cache now holds cache_len pairs
    level d:  toks_d = topk(parent logits, K)[parent row, rank]              # static gathers
              draft(toks_d[with children], parent feature, cache_len + d - 1, cache_len, k')
              with tree_attention's suffix = every drafted ancestor level's K/V and the static
              ancestor mask (the prefix is the draft cache; drafted K/V never touch it)
    return tree_tokens (B, T_tree), k'
Only nodes that have children are forwarded (a leaf's logits are never used).
Reduced draft vocabulary: if the one-level graph also outputs `token_ids` (Vd,), the target id
of each logit column, the picked top-k columns are mapped through it (toks_d = token_ids[cols]),
so level tokens, the next level's inputs and tree_tokens are target ids; without it columns are ids.
Requires: the one-level graph after tree_attention(tree=None); inputs tokens, features,
input_pos, cache_len, caches; outputs logits, hidden, caches (+ token_ids). Required: raises on
no attention.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import TreeSpec

from .infra import aten, finish, inline_graph, outputs, placeholders, record, require

TREE_ATTN = "spec.tree_attention.default"


def unroll_draft(gm: fx.GraphModule, *, tree: TreeSpec) -> fx.GraphModule:
    src_graph, src_meta = gm.graph, dict(gm.meta)
    src = fx.GraphModule(gm, src_graph)
    src.meta = src_meta
    attn = [n for n in src_graph.nodes if str(n.target) == TREE_ATTN]
    require("unroll_draft", len(attn), "tree_attention nodes in the one-level draft graph")
    missing = {"tokens", "features", "input_pos", "cache_len"} - set(placeholders(src))
    if missing:
        raise SpecCompileError(f"unroll_draft: the graph has no input(s) {sorted(missing)}; it runs "
                               "once, on the one-level draft graph")
    caches = [k for k in placeholders(src) if k.startswith(("k_", "v_"))]
    _check_vocab(src, tree)
    g = fx.Graph()
    b = _Builder(g, gm)
    acc_tokens, acc_feats, n_acc, cache_len = (b.ph(n) for n in ("acc_tokens", "acc_feats", "n_acc", "cache_len"))
    cache_in = {k: b.ph(k) for k in caches}
    D, K = tree.max_depth, tree.top_k

    # Catch-up: the accepted (token, true feature) pairs, padded to D + 1.
    base = b(aten.sub.Tensor, cache_len, n_acc)
    pos = b(aten.add.Tensor, b(aten.unsqueeze.default, base, 1), b.const("draft_arange", torch.arange(D + 1)))
    out = inline_graph(g, src, {"tokens": acc_tokens, "features": acc_feats, "input_pos": pos,
                                "cache_len": base, **cache_in})
    cache_new = {k: out[k] for k in caches}
    token_ids = out.get("token_ids")  # (Vd,) logit column -> target id, or None (columns are ids)
    last = b(aten.unsqueeze.default, b(aten.sub.Tensor, n_acc, 1), 1)  # (B, 1)
    root_tok = b(aten.gather.default, acc_tokens, 1, last)  # (B, 1)
    prev_logits = _rows(b, out["logits"], last)  # (B, 1, V)
    prev_feats = _rows(b, out["hidden"], last)  # (B, 1, H)
    prev_nodes, level_tokens, forwarded = [0], [root_tok], []
    hist = [([], []) for _ in attn]
    n_forwards = 1
    has_child = set(tree.parent[1:])
    for d in range(1, D + 1):
        nodes = tree.level_nodes(d)
        rows = [prev_nodes.index(tree.parent[n]) for n in nodes]
        topk_ids = b(operator.getitem, b(aten.topk.default, prev_logits, K, -1), 1)  # (B, n_prev, K)
        flat = b(aten.flatten.using_ints, topk_ids, 1)  # (B, n_prev * K)
        pick = b.const(f"draft_pick_{d}", torch.tensor([r * K + tree.rank[n] for r, n in zip(rows, nodes)]))
        toks = b(aten.index_select.default, flat, 1, pick)  # (B, n_d) logit columns
        if token_ids is not None:
            toks = b(aten.index.Tensor, token_ids, [toks])  # (B, n_d) target ids
        level_tokens.append(toks)
        fwd = [n for n in nodes if n in has_child]
        if not fwd:
            break
        sel = b.const(f"draft_sel_{d}", torch.tensor([nodes.index(n) for n in fwd]))
        feat_rows = b.const(f"draft_rows_{d}", torch.tensor([rows[nodes.index(n)] for n in fwd]))
        depth_off = b.const(f"draft_depth_{d}", torch.full((len(fwd),), d - 1))
        forwarded += fwd
        mask = torch.tensor([[m in tree.ancestors(n) for m in forwarded] for n in fwd])
        mask_node = b.const(f"draft_mask_{d}", mask)  # (n_fwd_d, n_forwarded so far)
        env: dict = {}
        out = inline_graph(g, src, {
            "tokens": b(aten.index_select.default, toks, 1, sel),
            "features": b(aten.index_select.default, prev_feats, 1, feat_rows),
            "input_pos": b(aten.add.Tensor, b(aten.unsqueeze.default, cache_len, 1), depth_off),
            "cache_len": cache_len, **cache_new}, env=env)
        for i, a_src in enumerate(attn):
            _widen_suffix(g, env[a_src], hist[i], mask_node)
        prev_logits, prev_feats, prev_nodes = out["logits"], out["hidden"], fwd
        n_forwards += 1
    tree_tokens = b(aten.cat.default, level_tokens, 1)  # (B, T)
    g.output((tree_tokens, *cache_new.values()))
    gm.graph = g
    gm.meta = {**src_meta, "output_names": ["tree_tokens", *caches]}
    record(gm, "unroll_draft", n_forwards)
    return finish(gm)


def _check_vocab(src: fx.GraphModule, tree: TreeSpec) -> None:
    """The top-k needs at least K logit columns (a reduced draft vocabulary may have fewer)."""
    logits = outputs(src)["logits"]
    val = logits.meta.get("val") if isinstance(logits, fx.Node) else None
    if val is not None and isinstance(val.shape[-1], int) and val.shape[-1] < tree.top_k:
        raise SpecCompileError(f"unroll_draft: the draft scores {val.shape[-1]} tokens, fewer than "
                               f"tree {tree.name!r}'s top-k {tree.top_k}; use a larger --draft-vocab")


def _rows(b, x: fx.Node, last: fx.Node) -> fx.Node:
    """x (B, N, C) -> row `last` (B, 1) of each sequence: (B, 1, C)."""
    idx = b(aten.expand.default, b(aten.unsqueeze.default, last, 2), [-1, -1, b(aten.sym_size.int, x, 2)])
    return b(aten.gather.default, x, 1, idx)


def _widen_suffix(g: fx.Graph, a: fx.Node, hist: tuple[list, list], mask_node: fx.Node) -> None:
    """tree_attention's suffix := K/V of every forwarded ancestor level plus its own block."""
    q, kc, vc, k_new, v_new, cache_len, _, scale = a.args
    hist[0].append(k_new)
    hist[1].append(v_new)
    if len(hist[0]) > 1:
        with g.inserting_before(a):
            k_new = g.call_function(aten.cat.default, (list(hist[0]), 2))
            v_new = g.call_function(aten.cat.default, (list(hist[1]), 2))
    a.args = (q, kc, vc, k_new, v_new, cache_len, mask_node, scale)


class _Builder:
    """Appends aten calls and constants to a graph (short names keep the unrolling readable)."""

    def __init__(self, g: fx.Graph, gm: fx.GraphModule):
        self.g, self.gm = g, gm

    def __call__(self, target, *args):
        return self.g.call_function(target, args)

    def ph(self, name: str) -> fx.Node:
        n = self.g.placeholder(name)
        n.target = name
        return n

    def const(self, name: str, value: torch.Tensor) -> fx.Node:
        if hasattr(self.gm, name):
            assert torch.equal(getattr(self.gm, name), value), name
        else:
            self.gm.register_buffer(name, value)
        return self.g.get_attr(name)
