"""Functional cache writes -> outputs of the written rows and their slots (the ONNX backend's
counterpart of static_kv_cache).

Before:  k1 = scatter(k_cache, 2, idx, rows);  ...;  return (..., k1)        # whole cache returned
After:   ...;  return (..., rows_0, slots_0, rows_1, slots_1, ...)          # one pair per scatter
         rows (B, Hkv, T, Dh) what was written, slots (B, T) int64 the cache slots it went to
ONNX has no in-place writes, and returning every cache whole would move the caches' bytes on
every call; the rows are what a step adds (the accepted path after verify's compaction, a
prefill chunk, the draft's catch-up). The runtime writes each pair into its cache buffer after the
call, in order (`cache.scatter_(2, slots, rows)`). The graph's own later reads of a written cache
(a draft level reads the catch-up's rows through the prefix) keep reading the functional value.
Output names: `{cache}.rows{j}`, `{cache}.slots{j}`, listed in gm.meta["cache_writes"]; the
caches are recorded as written (meta["mutated_inputs"]), as static_kv_cache records them.
Requires: each returned state value is a chain of scatters at dim 2 rooted at an input
placeholder, whose index is `write_cache`'s: slots (B, 1, T, 1) expanded over heads and head
dim. Required: raises if a graph returns no such state.
"""

from __future__ import annotations

import torch
from torch import fx

from spec_compiler.errors import SpecCompileError

from .infra import aten, call_traced, finish, outputs, output_node, record, require, set_outputs
from .static_kv_cache import _chain


def return_cache_rows(gm: fx.GraphModule) -> fx.GraphModule:
    keep, writes, mutated = {}, {}, []
    listed = []
    for name, node in outputs(gm).items():
        chain = _chain(node)
        if chain is None:
            keep[name] = node
            continue
        mutated.append(chain[0].args[0].target)
        for j, s in enumerate(chain):
            rows, slots = _rows_and_slots(gm, s)
            writes[f"{name}.rows{j}"], writes[f"{name}.slots{j}"] = rows, slots
            listed.append([name, f"{name}.rows{j}", f"{name}.slots{j}"])
    require("return_cache_rows", len(listed), "returned cache values built by scatter from cache inputs")
    set_outputs(gm, {**keep, **writes})
    gm.meta["mutated_inputs"] = gm.meta.get("mutated_inputs", []) + mutated
    gm.meta["cache_writes"] = listed
    record(gm, "return_cache_rows", len(listed))
    return finish(gm)


def _rows_and_slots(gm: fx.GraphModule, s: fx.Node) -> tuple[fx.Node, fx.Node]:
    _, dim, index, src = s.args
    base = index.args[0] if index.op == "call_function" and index.target == aten.expand.default else None
    shape = base.meta["val"].shape if base is not None else None
    if s.kwargs or dim != 2 or shape is None or len(shape) != 4 or shape[1] != 1 or shape[3] != 1:
        raise SpecCompileError(f"return_cache_rows: {s.name} is not a write_cache of whole rows "
                               f"(dim {dim}, index {index.name}); this is a compiler bug")
    T = index.meta["val"].shape[2]
    with gm.graph.inserting_before(output_node(gm)):
        rows = call_traced(gm, lambda x: x.narrow(2, 0, T), src)  # (B, H, T, Dh)
        slots = call_traced(gm, lambda i: i[:, 0, :, 0], base)  # (B, T)
    return rows, slots

