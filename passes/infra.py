"""Pass plumbing: the Pass type, op counting, graph I/O helpers, graph inlining, the runner.

Invariants every pass keeps (Inductor's fx_passes rules): a pass is `(gm, **opts) -> gm`, reads
no globals, mutates in place and returns the same module; it leaves no new aliasing between
inputs and outputs; mutation (in-place cache writes) is introduced only by the last pass.
Graph inputs are placeholders whose `target` is their stable name; output names are kept in
`gm.meta["output_names"]` and every pass that changes the outputs updates them.
Each pass records how many nodes it rewrote in `gm.meta["pass_counts"][name]`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import fx

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


def register_constant(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A small static tensor (tree indices, masks) as a buffer + get_attr node."""
    name = name.replace(".", "_")
    if hasattr(gm, name):
        assert torch.equal(getattr(gm, name), value), f"constant {name} already set differently"
    else:
        gm.register_buffer(name, value)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        return gm.graph.get_attr(name)


def record(gm: fx.GraphModule, name: str, count: int) -> None:
    gm.meta.setdefault("pass_counts", {})[name] = gm.meta.get("pass_counts", {}).get(name, 0) + count


def require(name: str, count: int, expected: str) -> None:
    if count == 0:
        raise SpecCompileError(f"{name}: 0 matches, expected {expected}; the exported graph does "
                               "not have the form this pass rewrites (see passes/{name}.py)")


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


def _get_attr(m: torch.nn.Module, target: str):
    for a in target.split("."):
        m = getattr(m, a)
    return m


def _set_attr(m: torch.nn.Module, target: str, value) -> None:
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
