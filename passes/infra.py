"""Pass plumbing: the Pass type, op counting, graph I/O helpers, pattern matching, traced
replacements, graph inlining, the runner.

Invariants every pass keeps (Inductor's fx_passes rules): a pass is `(gm, **opts) -> gm`, reads
no globals, and returns the rewritten module (the same one, mutated in place, except
`unroll_draft`, which retraces the step as a new module sharing the parameters); it leaves no new
aliasing between inputs and outputs; mutation (in-place cache writes) is introduced only by the
last pass.
Patterns and replacements are plain torch functions, traced (`trace_pattern`, `call_traced`),
never spelled op by op: every node a pass adds carries `meta["val"]`.
Graph inputs are placeholders whose `target` is their stable name; output names are kept in
`gm.meta["output_names"]` and every pass that changes the outputs updates them.
Each pass records how many nodes it rewrote in `gm.meta["pass_counts"][name]`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from spec_compiler.errors import SpecCompileError

log = logging.getLogger("spec_compiler.passes")
aten = torch.ops.aten
Pass = Callable[[fx.GraphModule], fx.GraphModule]


def pass_name(p: Pass) -> str:
    f = getattr(p, "func", p)  # functools.partial
    return f.__name__


def count_ops(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    h: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            k = str(n.target)
            h[k] = h.get(k, 0) + 1
    return h


def placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}


def add_input(gm: fx.GraphModule, name: str, shape: tuple, dtype: torch.dtype) -> fx.Node:
    """A new graph input after the existing ones, with meta["val"] (on the graph's device)."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.target = name
    with fake_mode(gm):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device=device_of(gm))
    return node


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return dict(zip(gm.meta["output_names"], output_node(gm).args[0]))


def set_outputs(gm: fx.GraphModule, named: dict[str, fx.Node]) -> None:
    out = output_node(gm)
    out.args = (tuple(named.values()),)
    gm.meta["output_names"] = list(named)


def remove_placeholder(gm: fx.GraphModule, name: str) -> None:
    node = placeholders(gm)[name]
    assert not node.users, f"placeholder {name} still has users {list(node.users)}"
    gm.graph.erase_node(node)


def fake_mode(gm: fx.GraphModule) -> FakeTensorMode:
    """The fake mode of the graph's example values (export's, with its symbolic sizes)."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:  # a graph built by hand: static sizes only
        mode = gm.meta.setdefault("_fake_mode", FakeTensorMode(allow_non_fake_inputs=True))
    return mode


def attr_node(gm: fx.GraphModule, target: str) -> fx.Node:
    """A get_attr node for an existing parameter or buffer, with meta["val"], at the insertion
    point."""
    node = gm.graph.get_attr(target)
    node.meta["val"] = fake_mode(gm).from_tensor(get_attr_path(gm, target), static_shapes=True)
    return node


def register_constant(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A small static tensor (tree indices, masks) as a buffer + get_attr node (with meta["val"]),
    placed after the last placeholder. Constants belong on the graph's device."""
    name = name.replace(".", "_")
    if hasattr(gm, name):
        assert torch.equal(getattr(gm, name).cpu(), value.cpu()), f"constant {name} already set differently"
    else:
        gm.register_buffer(name, value)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode(gm).from_tensor(getattr(gm, name), static_shapes=True)
    return node


def device_of(gm: fx.GraphModule) -> torch.device:
    """The device of the graph's tensors (from a placeholder's example value)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def call_traced(gm: fx.GraphModule, fn: Callable, *args: fx.Node) -> Any:
    """Insert `fn(*args)` at the graph's current insertion point: `fn` is a plain torch function
    of tensors, traced with make_fx (pre-dispatch aten, the op level torch.export gives) on the
    arguments' example values, so it may use their (symbolic) sizes and every node it adds carries
    meta["val"]. Returns the node(s) standing for fn's output, in its structure (a node, or a
    tuple/list of them). Constants belong in `args` (register_constant), not inside `fn`."""
    vals = [a.meta["val"] for a in args]
    with fake_mode(gm):
        sub = make_fx(fn, tracing_mode="real", pre_dispatch=True)(*vals)
    env: dict[fx.Node, Any] = {}
    phs = iter(args)
    out = None
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(phs)
        elif n.op == "output":
            out = fx.map_arg(n.args[0], lambda x: env[x])
        elif n.op == "get_attr":
            raise AssertionError(f"call_traced: {fn} made tensor constant {n.target} inside the "
                                 "traced function; pass constants as arguments (register_constant)")
        else:
            env[n] = gm.graph.node_copy(n, lambda x: env[x])
            env[n].meta = dict(n.meta)
    return out


def trace_pattern(fn: Callable, args: Sequence[torch.Tensor], names: Sequence[str],
                  dynamic: dict[str, list[tuple[int, int]]],
                  normalize: Callable[[fx.GraphModule], fx.GraphModule] | None = None,
                  device: torch.device | str = "cpu") -> fx.GraphModule:
    """A plain torch function -> a pattern graph for `match_pattern`, traced by torch.export (the
    tracer that made the graphs it will be matched against), its inputs named `names`, which
    `match_pattern` reports the bindings of. `dynamic` names the sizes that are
    free in the pattern: {name: [(arg index, dim), ...]}. Each becomes a placeholder called
    `name`, which matches a literal int or a size node in the graph (the binding is checked by the
    caller); every other size is literal and must be equal. `normalize` (the cleanup pass) puts
    the pattern in the form the graphs have when they are matched. `args` live on the CPU: a
    CUDA operator's shape rules can pin the free sizes (SDPA's memory-efficient kernel aligns
    its mask); `device` is then written into the pattern's device arguments (arange's)."""
    from torch.export import Dim

    dims = {name: Dim(name, min=2) for name in dynamic}
    shapes: list[dict | None] = [None] * len(args)
    for name, places in dynamic.items():
        for i, d in places:
            shapes[i] = {**(shapes[i] or {}), d: dims[name]}

    class Pattern(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    with torch.no_grad():
        ep = torch.export.export(Pattern(), tuple(args), dynamic_shapes=(tuple(shapes),), strict=False)
    gm = ep.module()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_symbol = {str(inputs[i].meta["val"].shape[d]): name
                 for name, places in dynamic.items() for i, d in places}
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    sym_ph: dict[str, fx.Node] = {}
    named = dict(zip(inputs, names, strict=True))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(named[n])
            env[n].meta = dict(n.meta)
        elif n.op == "call_function" and n.target == aten.sym_size.int:
            name = by_symbol[str(n.meta["val"])]
            if name not in sym_ph:
                with g.inserting_after(env[inputs[-1]]):
                    sym_ph[name] = g.placeholder(name)
            env[n] = sym_ph[name]
        elif n.op == "call_function" and n.target in _NOISE:
            continue
        elif n.op == "output":
            g.output(fx.map_arg(n.args[0], lambda x: env[x]))
        elif n.op == "call_module":  # export's input-guard hook
            continue
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
            if "device" in n.kwargs:
                env[n].kwargs = {**n.kwargs, "device": torch.device(device)}
    g.eliminate_dead_code()
    pat = fx.GraphModule(torch.nn.Module(), g)
    return normalize(pat) if normalize is not None else pat


_NOISE = (aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default,
          aten._assert_scalar.default)


def match_pattern(gm: fx.GraphModule, pattern: fx.GraphModule) -> list[dict[str, Any]]:
    """Every non-overlapping occurrence of `pattern` (trace_pattern) in gm, as {pattern
    placeholder name: the graph node or literal bound to it, and "_out": [graph nodes standing for
    the pattern's outputs]}. Intermediate pattern nodes have no users outside a match."""
    matcher = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False,
                              remove_overlapping_matches=True, ignore_literals=False)
    found: list[dict[str, Any]] = []
    for m in matcher.match(gm.graph):
        m: InternalMatch
        bound = {pn.target: m.nodes_map[pn] for pn in pattern.graph.nodes if pn.op == "placeholder"
                 and pn in m.nodes_map}
        bound["_out"] = list(m.returning_nodes)
        found.append(bound)
    return found


def record(gm: fx.GraphModule, name: str, count: int) -> None:
    gm.meta.setdefault("pass_counts", {})[name] = gm.meta.get("pass_counts", {}).get(name, 0) + count


def require(name: str, count: int, expected: str) -> None:
    if count == 0:
        raise SpecCompileError(f"{name}: 0 matches, expected {expected}; the exported graph does "
                               f"not have the form this pass rewrites (see passes/{name}.py)")


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def inline_graph(dst: fx.Graph, src: fx.GraphModule, inputs: dict[str, fx.Node],
                 env: dict | None = None) -> dict[str, fx.Node]:
    """Copy `src`'s nodes into `dst` at the current insertion point, with its placeholders bound
    to `inputs` (by name). get_attr targets are shared, so `dst` must belong to the module that
    owns them. Returns src's outputs by name; `env`, if given, is filled with the src node ->
    copy map."""
    env = {} if env is None else env
    for n in src.graph.nodes:
        if n.op == "placeholder":
            if n.target not in inputs:
                raise KeyError(f"inline_graph: no binding for input {n.target!r}")
            env[n] = inputs[n.target]
        elif n.op == "output":
            return {k: env[v] for k, v in zip(src.meta["output_names"], n.args[0])}
        else:
            env[n] = dst.node_copy(n, lambda x: env[x])
            env[n].meta = dict(n.meta)
    raise AssertionError("graph has no output node")


def get_attr_path(m: torch.nn.Module, target: str):
    for a in target.split("."):
        m = getattr(m, a)
    return m


def set_attr_path(m: torch.nn.Module, target: str, value) -> None:
    *path, leaf = target.split(".")
    for a in path:
        if not hasattr(m, a):
            m.add_module(a, torch.nn.Module())
        m = getattr(m, a)
    if isinstance(value, torch.nn.Parameter):
        m.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        m.register_buffer(leaf, value)
    else:
        setattr(m, leaf, value)


def run_passes(gm: fx.GraphModule, passes: list[Pass], debug_dir: Path | None = None,
               graph_name: str = "graph") -> fx.GraphModule:
    """Run `passes` in order; lint after each; name the failing pass and what ran before it."""
    done: list[str] = []
    log.info("%s: passes %s", graph_name, [pass_name(p) for p in passes])
    for i, p in enumerate(passes):
        name = pass_name(p)
        before = op_histogram(gm) if debug_dir else None
        try:
            out = p(gm)
        except SpecCompileError:
            raise
        except Exception as e:
            raise RuntimeError(f"{graph_name}: pass {name!r} failed after {done}: {e}") from e
        assert isinstance(out, fx.GraphModule), f"pass {name} returned {type(out)}"
        gm = out
        gm.graph.lint()
        done.append(name)
        if debug_dir:
            debug_dir.mkdir(parents=True, exist_ok=True)
            after = op_histogram(gm)
            diff = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
                    if after.get(k, 0) != before.get(k, 0)}
            (debug_dir / f"{graph_name}.{i:02d}_{name}.txt").write_text(
                gm.print_readable(print_output=False) + f"\n# op delta: {diff}\n")
    gm.meta.setdefault("passes", []).extend(done)
    return gm
