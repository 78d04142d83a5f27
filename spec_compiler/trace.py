"""nn.Module + example inputs -> aten-level `fx.GraphModule` (torch.export, no decompositions).

The result has one placeholder per flat input, named as given, a flat tuple output whose names
live in `gm.meta["output_names"]`, and parameters as `get_attr` nodes (`ep.module()`), so the
passes can rewrite weights (projection fusion) and the lowering can lift them to inputs.
SDPA stays `aten.scaled_dot_product_attention` (no `run_decompositions`): tree_attention
matches it.
"""

from __future__ import annotations

import inspect

import torch
from torch import fx
from torch.export import Dim


def trace(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
          dynamic_dim: dict[str, int] | None = None,
          buffer_outputs: dict[str, str] | None = None) -> fx.GraphModule:
    """Export `module(*args)`. `dynamic_dim` maps input name -> the dim that is the block length T
    (one shared symbol), for graphs that the unroll pass re-instantiates at several lengths.
    `buffer_outputs` maps extra output names to buffers of the module returned as they are (model
    data, such as a draft's hot-token ids, that later passes read): they are appended to the
    outputs and listed in gm.meta["weight_buffers"], so lowering stores them with the weights."""
    assert len(input_names) == len(args), (input_names, len(args))
    dynamic_shapes = None
    if dynamic_dim:
        t = Dim("T", min=2, max=4096)
        per_input = [{dynamic_dim[n]: t} if n in dynamic_dim else None for n in input_names]
        params = list(inspect.signature(module.forward).parameters.values())
        n_fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
        dynamic_shapes = (*per_input[:n_fixed], tuple(per_input[n_fixed:]))
    with torch.no_grad():
        ep = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
    unlifted = ep.module()
    # A plain GraphModule: flat inputs/outputs (no pytree codegen, no input-spec check hooks).
    gm = fx.GraphModule(unlifted, unlifted.graph)
    gm.graph._codegen = fx.graph.CodeGen()
    for n in list(gm.graph.nodes):  # export's input-guard hook: shapes are fixed from here on
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], input_names):
        node.name = node.target = name
    n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    assert n_out == len(output_names), (n_out, output_names)
    gm.meta["output_names"] = list(output_names)
    if buffer_outputs:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        nodes = []
        kept = dict(gm.named_buffers())  # export keeps every buffer of the module, used or not
        for target in buffer_outputs.values():
            if target not in kept:
                raise ValueError(f"trace: {target!r} is not a buffer of {type(module).__name__}")
            with gm.graph.inserting_before(out):
                nodes.append(gm.graph.get_attr(target))
        out.args = (tuple(out.args[0]) + tuple(nodes),)
        gm.meta["output_names"] += list(buffer_outputs)
        gm.meta["weight_buffers"] = list(buffer_outputs.values())
    gm.recompile()
    return gm


def input_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]
