"""Remove export noise that would hide patterns from later passes, then dead code.

Before:  _assert_tensor_metadata(x, dtype=...);  y = to(x, float32)   # x already float32
         z = slice(x, d, 0, 2**63 - 1)   # a whole dimension (dynamic-shape exports write these)
After:   (nothing);                               uses of y and z -> x
Static and dynamic exports of the same code then have the same form, so one traced pattern
matches both (patterns are normalised by this pass too: infra.trace_pattern).
Requires: node.meta["val"] for the dtype check. Optional: never raises on zero matches.
"""

from __future__ import annotations

import sys

import torch
from torch import fx

from .infra import aten, finish, record

_NOISE = (aten._assert_tensor_metadata.default,)


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    count = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in _NOISE:
            gm.graph.erase_node(n)
            count += 1
        elif (n.target == aten.to.dtype and _same_dtype(n)) or _whole_slice(n):  # -> x
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            count += 1
    record(gm, "cleanup", count)
    return finish(gm)


def _whole_slice(n: fx.Node) -> bool:
    """slice(x, dim, 0, INT64_MAX[, 1]): every element of the dimension, i.e. x itself."""
    if n.target != aten.slice.Tensor:
        return False
    args = list(n.args) + [None] * (5 - len(n.args))
    _, _, start, end, step = args[:5]
    return start in (0, None) and end in (None, sys.maxsize) and step in (1, None) and not n.kwargs


def _same_dtype(n: fx.Node) -> bool:
    src = n.args[0]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == n.args[1]
