"""One draft forward -> the whole draft step: EAGLE catch-up + the tree's levels, straight-line.

Before (one level, block length T symbolic):
    logits, feat, k' = draft(tokens, features, input_pos, cache_len, k)     # causal tree_attention
After (static, for a tree of depth D, top-k K): `DraftStep.forward` below, retraced by
torch.export into one graph:
    catch-up: draft(acc_tokens, acc_feats, base + [0, D], base, k)          # base = cache_len - n_acc
              -> the root's draft logits/feature = row n_acc - 1; cache now holds cache_len pairs
    level d:  toks_d = topk(parent logits, K)[parent row, rank]              # static indices
              draft(toks_d[with children], parent feature, cache_len + d - 1, cache_len, k')
              with tree_attention's suffix = every drafted ancestor level's K/V and the static
              ancestor mask (the prefix is the draft cache; drafted K/V never touch it)
    return tree_tokens (B, T_tree), k'
Only nodes that have children are forwarded (a leaf's logits are never used).
EAGLE-3 (`project`, the draft's fc): the catch-up reads the target's fused features (F = 3 x
hidden), the levels the draft's own (hidden); the one-level graph is the one traced for the
latter (no fc), and the step applies `project` to acc_feats before the catch-up, so acc_feats is
(B, D+1, F) while every draft forward sees hidden-wide features. Its weight keeps the name it
has in draft_prefill (`fc.weight`).
Reduced draft vocabulary: if the one-level graph also outputs `token_ids` (Vd,), the target id
of each logit column, the picked top-k columns are mapped through it (toks_d = token_ids[cols]),
so level tokens, the next level's inputs and tree_tokens are target ids; without it columns are ids.

The one-level graph is called as a module (`_level`: its tree_attention suffix widened to take
the earlier levels' K/V and a mask as inputs, its block K/V returned), so the step reads as
torch and the retrace gives every node static shapes and meta["val"]. The pass returns that new
module (sharing the parameters); its inputs are acc_tokens, acc_feats, n_acc, cache_len, caches.
Requires: the one-level graph after tree_attention(tree=None); inputs tokens, features,
input_pos, cache_len, caches; outputs logits, hidden, caches (+ token_ids). Required: raises on
no attention.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from spec_compiler.errors import SpecCompileError
from spec_compiler.trace import trace
from spec_compiler.trees import TreeSpec

from .cleanup import cleanup
from .infra import (aten, device_of, get_attr_path, outputs, placeholders, record, require,
                    set_attr_path)

TREE_ATTN = torch.ops.spec.tree_attention.default


def unroll_draft(gm: fx.GraphModule, *, tree: TreeSpec, width: int | None = None,
                 project: nn.Linear | None = None) -> fx.GraphModule:
    """`width` (default D + 1): the accepted pairs the catch-up reads, the engine's step-state
    width (engine_format: a bucket after a deeper bucket's step catches up all it accepted).
    `project`: an EAGLE-3 head's fc (the module docstring)."""
    width = tree.max_depth + 1 if width is None else width
    if width < tree.max_depth + 1:
        raise SpecCompileError(f"unroll_draft: width {width} < tree depth + 1 ({tree.max_depth + 1})")
    attn = [n for n in gm.graph.nodes if n.target == TREE_ATTN]
    require("unroll_draft", len(attn), "tree_attention nodes in the one-level draft graph")
    ph = placeholders(gm)
    missing = {"tokens", "features", "input_pos", "cache_len"} - set(ph)
    if missing:
        raise SpecCompileError(f"unroll_draft: the graph has no input(s) {sorted(missing)}; it runs "
                               "once, on the one-level draft graph")
    _check_vocab(gm, tree)
    caches = [k for k in ph if k.startswith(("k_", "v_"))]
    token_ids = outputs(gm).get("token_ids")
    hot = get_attr_path(gm, token_ids.target) if token_ids is not None else None
    hot_name = token_ids.target if token_ids is not None else None
    level = _level(gm, attn, caches)
    step = DraftStep(level, tree, caches, len(attn), hot, device_of(gm), width, project)
    args = [_example(ph[n]) for n in ("tokens", "features", "cache_len")]
    B, D1 = args[0].shape[0], width
    F = args[1].shape[2] if project is None else project.in_features
    acc_tokens = torch.zeros(B, D1, dtype=torch.long, device=args[0].device)
    acc_feats = torch.zeros(B, D1, F, dtype=args[1].dtype, device=args[1].device)
    n_acc = torch.ones(B, dtype=torch.long, device=args[0].device)
    example = [acc_tokens, acc_feats, n_acc, args[2] + D1, *[_example(ph[k]) for k in caches]]
    names = ["acc_tokens", "acc_feats", "n_acc", "cache_len", *caches]
    new = cleanup(trace(step, example, names, ["tree_tokens", *caches]))
    _rename_attrs(new, lambda t: hot_name if t == "hot_ids" else
                  "fc." + t.removeprefix("project.") if t.startswith("project.") else t.removeprefix("level."))
    delattr(new, "level")
    if project is not None:
        delattr(new, "project")
    if hot is not None and hot_name != "hot_ids":
        delattr(new, "hot_ids")
    meta = {k: v for k, v in gm.meta.items() if k not in ("output_names", "weight_buffers")}
    new.meta.update(meta)
    if hot is not None:
        new.meta["weight_buffers"] = [hot_name]
    record(new, "unroll_draft", step.n_forwards)
    return new


def _rename_attrs(gm: fx.GraphModule, rename) -> None:
    """Weights read through the `level` submodule, and the hot ids, keep the names they have in
    the one-level graph (as in draft_prefill), so an engine names each weight once."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and rename(n.target) != n.target:
            name = rename(n.target)
            set_attr_path(gm, name, get_attr_path(gm, n.target))
            n.target = name
    gm.recompile()


def _example(node: fx.Node) -> torch.Tensor:
    v = node.meta["val"]
    shape = [s if isinstance(s, int) else 2 for s in v.shape]
    return torch.zeros(shape, dtype=v.dtype, device=v.device)


class DraftStep(nn.Module):
    """The draft step in plain torch: catch-up over the accepted pairs, then each tree level."""

    def __init__(self, level: fx.GraphModule, tree: TreeSpec, caches: list[str], n_attn: int,
                 hot_ids: torch.Tensor | None, device: torch.device, width: int,
                 project: nn.Linear | None = None):
        super().__init__()
        self.level, self.tree, self.n_caches, self.n_attn = level, tree, len(caches), n_attn
        self.project = project
        if hot_ids is not None:
            self.register_buffer("hot_ids", hot_ids)
        else:
            self.hot_ids = None
        D, K = tree.max_depth, tree.top_k
        has_child = set(tree.parent[1:])
        self.levels = []  # per drafted level: (pick, sel, rows, mask) buffer names, or None
        prev, forwarded = [0], []
        for d in range(1, D + 1):
            nodes = tree.level_nodes(d)
            rows = [prev.index(tree.parent[n]) for n in nodes]  # parent's row in the previous level
            fwd = [n for n in nodes if n in has_child]
            forwarded += fwd
            bufs = {
                "pick": [r * K + tree.rank[n] for r, n in zip(rows, nodes)],  # flat (row, rank)
                "sel": [nodes.index(n) for n in fwd],  # level nodes that are forwarded
                "rows": [rows[nodes.index(n)] for n in fwd],  # their parents' feature rows
                "mask": [[m in tree.ancestors(n) for m in forwarded] for n in fwd],  # vs history
            }
            for k, v in bufs.items():
                self.register_buffer(f"{k}_{d}", torch.tensor(v, device=device))
            self.levels.append(bool(fwd))
            prev = fwd
            if not fwd:
                break
        self.register_buffer("catchup_pos", torch.arange(width, device=device))
        self.register_buffer("catchup_mask", torch.ones(width, width, dtype=torch.bool, device=device).tril())
        self.n_forwards = 1 + sum(self.levels)

    def forward(self, acc_tokens, acc_feats, n_acc, cache_len, *caches):
        B = acc_tokens.shape[0]
        # Catch-up: the accepted (token, true feature) pairs, padded to `width`, at their slots.
        base = cache_len - n_acc
        empty = [c.new_zeros(B, c.shape[1], 0, c.shape[3]) for c in caches[:2 * self.n_attn]]
        if self.project is not None:  # EAGLE-3: the target's fused layers -> the draft's width
            acc_feats = self.project(acc_feats)
        logits, feats, caches, _ = self._call(acc_tokens, acc_feats, base[:, None] + self.catchup_pos,
                                              base, self.catchup_mask, empty, caches)
        last = (n_acc - 1)[:, None]  # (B, 1): the root's row
        tokens = [acc_tokens.gather(1, last)]
        logits = logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]))  # (B, 1, V)
        feats = feats.gather(1, last[..., None].expand(-1, -1, feats.shape[-1]))  # (B, 1, H)
        hist: list[list[torch.Tensor]] = [[] for _ in range(2 * self.n_attn)]
        for d, forwards in enumerate(self.levels, start=1):
            cols = logits.topk(self.tree.top_k, -1).indices.flatten(1).index_select(1, getattr(self, f"pick_{d}"))
            toks = cols if self.hot_ids is None else self.hot_ids[cols]  # (B, n_d) target ids
            tokens.append(toks)
            if not forwards:
                break
            x = toks.index_select(1, getattr(self, f"sel_{d}"))
            f = feats.index_select(1, getattr(self, f"rows_{d}"))
            pos = (cache_len[:, None] + (d - 1)).expand(-1, x.shape[1])
            past = [torch.cat(h, 2) if h else e for h, e in zip(hist, empty)]
            logits, feats, _, block = self._call(x, f, pos, cache_len, getattr(self, f"mask_{d}"),
                                                 past, caches)
            for h, b in zip(hist, block):
                h.append(b)
        return (torch.cat(tokens, 1), *caches)

    def _call(self, tokens, features, input_pos, cache_len, mask, past, caches):
        out = self.level(tokens, features, input_pos, cache_len, *caches, mask, *past)
        n = self.n_caches
        return out[0], out[1], list(out[2:2 + n]), list(out[2 + n:])


def _level(gm: fx.GraphModule, attn: list[fx.Node], caches: list[str]) -> fx.GraphModule:
    """A copy of the one-level graph whose attention suffix is [earlier levels' K/V | block]:
    new inputs `mask` (T, Th + T) and per attention `k_past_i`, `v_past_i` (B, Hkv, Th, Dh);
    outputs logits, hidden, caches, then every attention's block K/V (for the next level)."""
    g = fx.Graph()
    env: dict = {}
    out = g.graph_copy(gm.graph, env)
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_before(last.next):  # new inputs after the existing ones, in this order
        mask = g.placeholder("mask")
        past = [g.placeholder(f"{kv}_past_{i}") for i in range(len(attn)) for kv in "kv"]
    block = []
    for i, a in enumerate(attn):
        node = env[a]
        q, kc, vc, k_new, v_new, cache_len, _, scale = node.args
        with g.inserting_before(node):
            k_all = g.call_function(aten.cat.default, ([past[2 * i], k_new], 2))
            v_all = g.call_function(aten.cat.default, ([past[2 * i + 1], v_new], 2))
        node.args = (q, kc, vc, k_all, v_all, cache_len, mask, scale)
        block += [k_new, v_new]
    named = dict(zip(gm.meta["output_names"], out))
    g.output((named["logits"], named["hidden"], *[named[k] for k in caches], *block))
    g.eliminate_dead_code()
    level = fx.GraphModule(gm, g)
    level.graph._codegen = fx.graph.CodeGen()
    level.recompile()
    return level


def _check_vocab(src: fx.GraphModule, tree: TreeSpec) -> None:
    """The top-k needs at least K logit columns (a reduced draft vocabulary may have fewer)."""
    logits = outputs(src)["logits"]
    val = logits.meta.get("val") if isinstance(logits, fx.Node) else None
    if val is not None and isinstance(val.shape[-1], int) and val.shape[-1] < tree.top_k:
        raise SpecCompileError(f"unroll_draft: the draft scores {val.shape[-1]} tokens, fewer than "
                               f"tree {tree.name!r}'s top-k {tree.top_k}; use a larger --draft-vocab")
