"""Remove export noise that would hide patterns from later passes, then dead code.

Before:  _assert_tensor_metadata(x, dtype=...);  y = to(x, float32)   # x already float32
After:   (nothing);                               uses of y -> x
Requires: node.meta["val"] for the dtype check. Optional: never raises on zero matches.
"""

from __future__ import annotations

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
        elif n.target == aten.to.dtype and _same_dtype(n):  # to(x, x.dtype) -> x
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            count += 1
    record(gm, "cleanup", count)
    return finish(gm)


def _same_dtype(n: fx.Node) -> bool:
    src = n.args[0]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == n.args[1]
