"""Append acceptance (greedy, or speculative sampling at temperature > 0, per sequence), emitted
tokens, KV compaction and the next root to the verify graph.

Before:  logits (B,T,V), hidden (B,T,H), k' = write_cache(k, k_new, cache_len)   (all T tree slots)
After:   `accept` and `compact` below, traced into the graph:
         target_next = argmax(logits)                                   # (B, T)
         match[n]    = tokens[n] == target_next[parent[n]]   (root: True)
         acc[p]      = sum(cumprod(match[paths[p]]))          # accepted nodes on path p, root incl.
         best        = argmax(acc) (first, deterministic);  n_acc = acc[best]
         path        = paths[best]                                      # (B, D+1) node ids
         acc_tokens  = target_next[path]   # the emitted tokens: accepted drafts + the bonus token
         acc_feats   = hidden[path]        # their true target features, for the draft's catch-up
         k'          = write_cache(k, k_new[path], cache_len)  # compaction: only the path's rows
         cache_len'  = cache_len + n_acc
Rows with temperature > 0 instead take the path, emitted tokens and bonus token of
`sampling.tree_accept` (multi-round speculative sampling over the tree, lossless; randomness
keyed by the row's seed and the token positions), on the distribution `sampling.warp` gives
(temperature, top-k, top-p); rows at temperature 0 keep the greedy result above bit for bit.
With sampling=True (the verify_sampled graph) the new inputs are temperature, top_p, top_k,
seed (B,) per sequence (the engine contract's order); without, the graph is greedy alone.
Entries past n_acc are padding (written past cache_len', ignored). The new root is
acc_tokens[n_acc - 1] with feature acc_feats[n_acc - 1]; the draft graph reads it from there.
Requires: tree_attention(tree=...) has run; placeholders tokens, cache_len; each returned cache
is `models.llama.write_cache` of this block (matched as a traced pattern). Required: raises if no
cache write matches.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from spec_compiler import sampling
from spec_compiler.errors import SpecCompileError
from spec_compiler.models.llama import write_cache
from spec_compiler.trees import TreeSpec

from .cleanup import cleanup
from .infra import (add_input, call_traced, device_of, finish, match_pattern, outputs, placeholders,
                    record, register_constant, require, set_outputs, trace_pattern)


# Per-sequence sampling inputs the verify graph gains, in the engine contract's order.
SAMPLING_INPUTS = (("temperature", torch.float32), ("top_p", torch.float32), ("top_k", torch.int64),
                   ("seed", torch.int64))


def accept(tokens, logits, hidden, cache_len, parent, is_root, paths, path_ok):
    """Greedy acceptance over a static tree. tokens (B, T) drafted ids (node 0 = root), logits
    (B, T, V), hidden (B, T, H), cache_len (B,); tree tensors parent (T,), is_root (T,), paths
    (P, D+1) node ids of each root-to-leaf path (padding: 0) with path_ok (P, D+1) marking real
    entries. -> acc_tokens (B, D+1), acc_feats (B, D+1, H), n_acc (B,), cache_len', path (B, D+1)."""
    target_next = logits.argmax(-1)  # (B, T)
    match = (tokens == target_next[:, parent]) | is_root  # node n agrees with the target at its parent
    on_path = match[:, paths] & path_ok  # (B, P, D+1)
    acc = on_path.long().cumprod(-1).sum(-1)  # (B, P): accepted prefix length of each path
    best = acc.argmax(-1)  # (B,): the first longest path
    n_acc = acc.gather(1, best[:, None]).squeeze(1)
    path = paths[best]  # (B, D+1)
    acc_tokens = target_next.gather(1, path)
    acc_feats = hidden.gather(1, path[..., None].expand(-1, -1, hidden.shape[-1]))
    return acc_tokens, acc_feats, n_acc, cache_len + n_acc, path


def accept_sampled(tokens, logits, hidden, cache_len, temperature, top_p, top_k, seed, parent,
                   is_root, paths, path_ok, children, depth, *, max_depth: int, width: int):
    """`accept`, with rows at temperature > 0 replaced by speculative sampling's outcome: the
    accepted path's drafted tokens then the bonus token. Same outputs as `accept` (`width`
    columns); speculative sampling walks the tree's own `max_depth` levels."""
    acc_tokens, acc_feats, n_acc, new_len, path = accept(tokens, logits, hidden, cache_len, parent,
                                                         is_root, paths, path_ok)
    probs = sampling.warp(logits, temperature, top_k, top_p)
    s_path, s_n, bonus = sampling.tree_accept(tokens, probs, children, depth, cache_len, seed,
                                              max_depth, width)
    after = torch.cat((tokens.gather(1, s_path)[:, 1:], torch.zeros_like(s_path[:, :1])), 1)
    col = torch.arange(width, device=tokens.device)
    s_tokens = torch.where(col == (s_n - 1)[:, None], bonus[:, None], after)
    s_feats = hidden.gather(1, s_path[..., None].expand(-1, -1, hidden.shape[-1]))
    hot = (temperature > 0)[:, None]
    return (torch.where(hot, s_tokens, acc_tokens), torch.where(hot[..., None], s_feats, acc_feats),
            torch.where(hot[:, 0], s_n, n_acc), torch.where(hot[:, 0], cache_len + s_n, new_len),
            torch.where(hot, s_path, path))


def compact(cache, new, path, cache_len):
    """The accepted path's rows of the block's K/V (B, Hkv, T, Dh) to slots cache_len + [0, D+1)."""
    B, H, _, Dh = new.shape
    rows = new.gather(2, path[:, None, :, None].expand(B, H, path.shape[1], Dh))
    return write_cache(cache, rows, cache_len)


def accept_epilogue(gm: fx.GraphModule, *, tree: TreeSpec, sampling: bool = False,
                    width: int | None = None) -> fx.GraphModule:
    """`width` (default D + 1): the columns of acc_tokens/acc_feats, and the rows compacted; an
    engine whose buckets have trees of different depths gives every bucket its deepest D + 1
    (engine_format: one state shape for all buckets), the columns past this tree's D + 1 being
    padding like any entry past n_acc."""
    width = tree.max_depth + 1 if width is None else width
    if width < tree.max_depth + 1:
        raise SpecCompileError(f"accept_epilogue: width {width} < tree depth + 1 ({tree.max_depth + 1})")
    ph, outs = placeholders(gm), outputs(gm)
    if "logits" not in outs or "hidden" not in outs:
        raise SpecCompileError("accept_epilogue: the graph returns no logits/hidden to accept "
                               f"from (outputs: {list(outs)}); it runs once, on the verify graph")
    dev = device_of(gm)
    paths = tree.leaf_paths()  # (P, D+1), -1 padded
    paths = torch.cat((paths, paths.new_full((paths.shape[0], width - paths.shape[1]), -1)), 1)
    tables = [("parent", torch.tensor(tree.parent)), ("is_root", torch.arange(tree.n_nodes) == 0),
              ("paths", paths.clamp(min=0)), ("path_valid", paths >= 0)]
    if sampling:
        tables += [("children", tree.children_table()), ("depth", torch.tensor(tree.depth))]
    consts = [register_constant(gm, f"tree_{name}_{tree.n_nodes}", value.to(dev)) for name, value in tables]
    B = ph["tokens"].meta["val"].shape[0]
    knobs = [add_input(gm, name, (B,), dtype) for name, dtype in SAMPLING_INPUTS] if sampling else []
    writes = _cache_writes(gm, set(outs.values()))
    require("accept_epilogue", len(writes), "one cache write (write_cache) per returned cache")
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    with gm.graph.inserting_before(out_node):
        # Sampling walks the tree's own levels; the columns past them are padding. (Walking all
        # width - 1 levels gave plain decoding's sampled graph in a speculating engine five
        # rounds over the root alone: that graph's lowering stalled on an H200 for over 20
        # minutes, and on a CPU the acceptance alone lowered 41x slower, bench/compile_accept.py.)
        fn = (functools.partial(accept_sampled, max_depth=tree.max_depth, width=width) if sampling
              else accept)
        acc_tokens, acc_feats, n_acc, new_len, path = call_traced(
            gm, fn, ph["tokens"], outs["logits"], outs["hidden"], ph["cache_len"], *knobs, *consts)
        compacted = {w: call_traced(gm, compact, m["cache"], m["new"], path, m["cache_len"])
                     for w, m in writes.items()}
    new_outs = {"acc_tokens": acc_tokens, "acc_feats": acc_feats, "n_acc": n_acc, "cache_len": new_len}
    for name, node in outs.items():
        if name not in ("logits", "hidden"):
            new_outs[name] = compacted.get(node, node)
    set_outputs(gm, new_outs)  # the all-slots writes are dead now: finish() drops them
    record(gm, "accept_epilogue", len(writes) + 1)
    return finish(gm)


def _cache_writes(gm: fx.GraphModule, returned: set) -> dict[fx.Node, dict]:
    """Returned write_cache nodes of the whole block (slots cache_len + [0, T)) -> bindings."""
    found = {}
    for key in {_key(n) for n in returned if _key(n) is not None}:
        for m in match_pattern(gm, _pattern(*key)):
            write = m["_out"][0]
            new = m["new"].meta["val"]
            if write in returned and statically_known_true(m.get("T") == new.shape[2]):
                found[write] = m
    return found


def _key(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or n.target != torch.ops.aten.scatter.src:
        return None
    return (v.shape[0], v.shape[1], v.shape[3], v.dtype, v.device)


@functools.lru_cache(maxsize=None)
def _pattern(B: int, H: int, Dh: int, dtype: torch.dtype, device: torch.device) -> fx.GraphModule:
    """`write_cache` traced for a (B, H, S, Dh) cache and a (B, H, T, Dh) block, S and T free."""
    cache = torch.zeros(B, H, 11, Dh, dtype=dtype)
    new = torch.zeros(B, H, 3, Dh, dtype=dtype)
    return trace_pattern(write_cache, (cache, new, torch.zeros(B, dtype=torch.long)),
                         ("cache", "new", "cache_len"), {"S": [(0, 2)], "T": [(1, 2)]},
                         normalize=cleanup, device=device)
