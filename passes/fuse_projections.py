"""Fuse sibling projections that read the same input into one matmul (q/k/v, gate/up).

Before:  q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
After:   q, k, v = linear(x, cat(Wq, Wk, Wv)).split([dq, dk, dv], -1)   (traced in)
The fused weight is computed once, at compile time, and registered as a new parameter named
after its parts (deterministic, so graphs that share weights share the fused one too).
Requires: weights (and biases, if any) are get_attr parameters. Optional: logs a count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .infra import attr_node, aten, call_traced, finish, get_attr_path, record, set_attr_path


def fuse_projections(gm: fx.GraphModule) -> fx.GraphModule:
    count = 0
    for x in list(gm.graph.nodes):
        group = [u for u in x.users if _is_fusable(u, x)]
        if len(group) < 2:
            continue
        has_bias = [len(u.args) > 2 and u.args[2] is not None for u in group]
        if any(has_bias) and not all(has_bias):
            continue
        _fuse(gm, x, sorted(group, key=_order(gm)), all(has_bias))
        count += 1
    record(gm, "fuse_projections", count)
    return finish(gm)


def _order(gm):
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: pos[n]


def _is_fusable(u: fx.Node, x: fx.Node) -> bool:
    return (u.op == "call_function" and u.target == aten.linear.default and u.args[0] is x
            and isinstance(u.args[1], fx.Node) and u.args[1].op == "get_attr"
            and (len(u.args) < 3 or u.args[2] is None
                 or (isinstance(u.args[2], fx.Node) and u.args[2].op == "get_attr")))


def _fuse(gm: fx.GraphModule, x: fx.Node, group: list[fx.Node], bias: bool) -> None:
    ws = [get_attr_path(gm, u.args[1].target) for u in group]
    name = "fused__" + "__".join(u.args[1].target.replace(".", "_") for u in group)
    if not hasattr(gm, name):
        set_attr_path(gm, name, torch.nn.Parameter(torch.cat([w.detach() for w in ws]), requires_grad=False))
    b_name = None
    if bias:
        b_name = name + "__bias"
        if not hasattr(gm, b_name):
            bs = [get_attr_path(gm, u.args[2].target).detach() for u in group]
            set_attr_path(gm, b_name, torch.nn.Parameter(torch.cat(bs), requires_grad=False))
    sizes = [w.shape[0] for w in ws]
    with gm.graph.inserting_before(group[0]):
        params = [attr_node(gm, n) for n in ([name, b_name] if bias else [name])]
        parts = call_traced(gm, lambda x, w, *b: F.linear(x, w, *b).split(sizes, -1), x, *params)
    for u, part in zip(group, parts):
        u.replace_all_uses_with(part)
        gm.graph.erase_node(u)

