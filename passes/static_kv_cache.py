"""Functional cache (and state) updates -> in-place writes into the persistent input buffers.

Before:  k1 = scatter(k_cache, 2, idx, k_new);  ...;  return (..., k1)       # new cache returned
After:   ...reads of the old k_cache...;  index_put_(k_cache, [b, h, idx, d], k_new);  ...;  return (...)
Each write moves to just after the last reader of the value it overwrites, every later reader of
the new value reads the input itself, and the output disappears (the caller's buffer *is* the
state). Runs last of the rewriting passes: it is the only one that introduces mutation.
The in-place write is `index_put_` (the scatter's index at its dimension, broadcast aranges at
the others: the same elements written), not `scatter_`: lowering functionalizes either, and
Inductor turns a functional index_put back into an in-place store of the written rows, while a
functional scatter stays a copy of the whole buffer, the scatter into the copy and a copy back
(three passes over every cache per step: on a CPU more bytes than the step's weights).
Requires: each returned state value is a chain of `scatter` ops rooted at an input placeholder.
Required: raises if a graph returns no such state.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import fx

from spec_compiler.errors import SpecCompileError

from .infra import aten, call_traced, finish, outputs, record, require, set_outputs

_SCATTER = aten.scatter.src


def scatter_in_place(buf: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, dim: int):
    """`buf.scatter_(dim, index, src)` as `index_put_`: element i of `index` goes to position
    index[i] along `dim` and i elsewhere; src is read at i (its leading `index.shape` part)."""
    idx = [torch.arange(n, device=index.device).view([-1 if k == d else 1 for k in range(index.dim())])
           for d, n in enumerate(index.shape)]
    idx[dim] = index
    for d, n in enumerate(index.shape):
        if src.shape[d] != n:
            src = src.narrow(d, 0, n)
    return buf.index_put_(idx, src)


def static_kv_cache(gm: fx.GraphModule) -> fx.GraphModule:
    outs = outputs(gm)
    keep, count, mutated = {}, 0, []
    for name, node in outs.items():
        chain = _chain(node)
        if chain is None:
            keep[name] = node
            continue
        mutated.append(chain[0].args[0].target)
        for s in chain:
            _make_inplace(gm, s)
            count += 1
    require("static_kv_cache", count, "returned cache values built by scatter from cache inputs")
    set_outputs(gm, keep)
    gm.meta["mutated_inputs"] = gm.meta.get("mutated_inputs", []) + mutated
    record(gm, "static_kv_cache", count)
    return finish(gm)


def _chain(node: fx.Node) -> list[fx.Node] | None:
    """[s1, ..., sk] when node = sk(...s1(placeholder)...), else None."""
    chain = []
    while node.op == "call_function" and node.target == _SCATTER:
        chain.append(node)
        node = node.args[0]
    return chain[::-1] if chain and node.op == "placeholder" else None


def _make_inplace(gm: fx.GraphModule, s: fx.Node) -> None:
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    base = s.args[0]
    root = base
    while root.op != "placeholder":
        root = root.args[0]
    old_readers = [u for u in base.users if u is not s]
    new_readers = list(s.users)
    after = max([s] + old_readers, key=pos.__getitem__)
    later = [u for u in new_readers if u.op != "output"]
    if later and min(pos[u] for u in later) <= pos[after]:
        raise SpecCompileError(f"static_kv_cache: {root.target} is read at its old value after "
                               "its new value is first used; cannot update it in place")
    if s.kwargs:  # scatter.src has no keyword arguments; reduce= is another overload
        raise SpecCompileError(f"static_kv_cache: unexpected scatter arguments {s.kwargs}")
    _, dim, index, src = s.args
    with gm.graph.inserting_before(after.next):  # in order, right after the last old reader
        call_traced(gm, partial(scatter_in_place, dim=dim), root, index, src)
    s.replace_all_uses_with(root)
    gm.graph.erase_node(s)
