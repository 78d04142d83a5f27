"""Append greedy acceptance, emitted tokens, KV compaction and the next root to the verify graph.

Before:  logits (B,T,V), hidden (B,T,H), k' = scatter(k, 2, cache_len + [0, T), k_new)
After:   target_next = argmax(logits)                                   # (B, T)
         match[n]    = tokens[n] == target_next[parent[n]]   (root: True)
         acc[p]      = sum(cumprod(match[paths[p]]))          # accepted nodes on path p, root incl.
         best        = argmax(acc) (first, deterministic);  n_acc = acc[best]
         path        = paths[best]                                      # (B, D+1) node ids
         acc_tokens  = target_next[path]   # the emitted tokens: accepted drafts + the bonus token
         acc_feats   = hidden[path]        # their true target features, for the draft's catch-up
         k'          = scatter(k, 2, cache_len + [0, D], k_new[path])   # compaction: only the path
         cache_len'  = cache_len + n_acc
Entries past n_acc are padding (written past cache_len', ignored). The new root is
acc_tokens[n_acc - 1] with feature acc_feats[n_acc - 1]; the draft graph reads it from there.
Requires: tree_attention(tree=...) has run; placeholders tokens, cache_len. Required: raises if
no cache write matches.
"""

from __future__ import annotations

import torch
from torch import fx

from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import TreeSpec

from .infra import aten, finish, outputs, placeholders, record, register_constant, require, set_outputs


def accept_epilogue(gm: fx.GraphModule, *, tree: TreeSpec) -> fx.GraphModule:
    ph, outs = placeholders(gm), outputs(gm)
    if "logits" not in outs or "hidden" not in outs:
        raise SpecCompileError("accept_epilogue: the graph returns no logits/hidden to accept "
                               f"from (outputs: {list(outs)}); it runs once, on the verify graph")
    tokens, cache_len = ph["tokens"], ph["cache_len"]
    g = gm.graph
    D = tree.max_depth
    paths = tree.leaf_paths()  # (P, D+1), -1 padded
    parent = register_constant(gm, f"tree_parent_{tree.n_nodes}", torch.tensor(tree.parent))
    is_root = register_constant(gm, f"tree_is_root_{tree.n_nodes}",
                                torch.arange(tree.n_nodes) == 0)
    path_idx = register_constant(gm, f"tree_paths_{tree.n_nodes}", paths.clamp(min=0))
    path_ok = register_constant(gm, f"tree_path_valid_{tree.n_nodes}", paths >= 0)
    arange = register_constant(gm, f"accept_arange_{D + 1}", torch.arange(D + 1))
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")

    def f(target, *args):
        return g.call_function(target, args)

    with g.inserting_before(out_node):
        target_next = f(aten.argmax.default, outs["logits"], -1)  # (B, T)
        at_parent = f(aten.index_select.default, target_next, 1, parent)  # (B, T)
        match = f(aten.logical_or.default, f(aten.eq.Tensor, tokens, at_parent), is_root)
        on_path = f(aten.logical_and.default,
                    f(aten.index.Tensor, match, [None, path_idx]), path_ok)  # (B, P, D+1)
        acc = f(aten.sum.dim_IntList, f(aten.cumprod.default, on_path, -1), [-1])  # (B, P)
        best = f(aten.argmax.default, acc, -1)  # (B,)
        n_acc = f(aten.squeeze.dim, f(aten.gather.default, acc, 1, f(aten.unsqueeze.default, best, 1)), 1)
        path = f(aten.index_select.default, path_idx, 0, best)  # (B, D+1)
        acc_tokens = f(aten.gather.default, target_next, 1, path)  # (B, D+1)
        hidden = outs["hidden"]
        h_idx = f(aten.expand.default, f(aten.unsqueeze.default, path, 2),
                  [-1, -1, f(aten.sym_size.int, hidden, 2)])
        acc_feats = f(aten.gather.default, hidden, 1, h_idx)  # (B, D+1, H)
        new_len = f(aten.add.Tensor, cache_len, n_acc)
        slots = f(aten.add.Tensor, f(aten.unsqueeze.default, cache_len, 1), arange)  # (B, D+1)
    count = 0
    new_outs = {"acc_tokens": acc_tokens, "acc_feats": acc_feats, "n_acc": n_acc, "cache_len": new_len}
    for name, node in outs.items():
        if name in ("logits", "hidden"):
            continue
        if node.op == "call_function" and node.target == aten.scatter.src:
            node = _compact(g, node, path, slots, out_node)
            count += 1
        new_outs[name] = node
    require("accept_epilogue", count, "one cache write (scatter) per returned cache")
    set_outputs(gm, new_outs)
    record(gm, "accept_epilogue", count + 1)
    return finish(gm)


def _compact(g: fx.Graph, write: fx.Node, path: fx.Node, slots: fx.Node, end: fx.Node) -> fx.Node:
    """scatter(k, 2, all tree slots, k_new) -> scatter(k, 2, cache_len + [0, D], k_new[path]),
    moved after the acceptance (it needs `path`)."""
    cache, dim, _, k_new = write.args
    with g.inserting_before(end):
        p = g.call_function(aten.unsqueeze.default, (g.call_function(aten.unsqueeze.default, (path, 1)), 3))
        sizes = [-1, g.call_function(aten.sym_size.int, (k_new, 1)), -1,
                 g.call_function(aten.sym_size.int, (k_new, 3))]
        src = g.call_function(aten.gather.default, (k_new, 2, g.call_function(aten.expand.default, (p, sizes))))
        s = g.call_function(aten.unsqueeze.default, (g.call_function(aten.unsqueeze.default, (slots, 1)), 3))
        dst = g.call_function(aten.expand.default, (s, sizes))
        new = g.call_function(aten.scatter.src, (cache, dim, dst, src))
    new.meta = dict(write.meta)
    write.replace_all_uses_with(new)
    g.erase_node(write)
    return new
