"""Rewritten GraphModule -> a compiled artifact. The only module that knows Inductor settings.

Weights are lifted out of the graph into inputs first (`lift_weights`), so one safetensors file
holds them once for every graph of the engine (the target's embedding and lm_head are shared
with the draft), and artifacts stay small. So do the buffers that are model data, which the
graph names in `gm.meta["weight_buffers"]` (a reduced-vocabulary draft's hot token ids). Small
static tensors made at compile time (tree indices, masks, rope frequencies) stay inside the
artifact as constants.

Backends:
  inductor  AOTInductor package (`.pt2`): loading it compiles nothing.
  eager     `torch.export.save` of the rewritten program, run op by op (debugging only).
  onnx      an ONNX model of the functional graph (export/onnx_export.py), run with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import fx

from spec_compiler.errors import SpecCompileError
from spec_compiler.passes.infra import get_attr_path

INDUCTOR_CONFIGS = {
    # Compile-time knobs only; never set globally.
    "max_autotune": False,
    "aot_inductor.package_constants_in_so": True,
}


class WeightRegistry:
    """Names -> tensors shared by all graphs of an engine; tied tensors are stored once."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_ptr: dict[tuple, str] = {}

    def add(self, name: str, t: torch.Tensor) -> str:
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in self._by_ptr:
            return self._by_ptr[key]
        if name in self.tensors:
            assert torch.equal(self.tensors[name], t), f"weight {name} differs between graphs"
            return name
        self.tensors[name] = t.detach()
        self._by_ptr[key] = name
        return name


def lift_weights(gm: fx.GraphModule, registry: WeightRegistry, prefix: str = "") -> list[str]:
    """Parameters and `gm.meta["weight_buffers"]` (get_attr) -> leading placeholders. Returns
    the weight names in input order."""
    # Every name of a tied parameter (the embedding that is also the lm_head): named_parameters()
    # lists one, and a graph reading the other would keep it as a constant (a second copy).
    params = ({n for n, _ in gm.named_parameters(remove_duplicate=False)}
              | set(gm.meta.get("weight_buffers", ())))
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    names: list[str] = []
    seen: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in params:
            continue
        wname = registry.add(prefix + node.target, get_attr_path(gm, node.target))
        if wname not in seen:
            with gm.graph.inserting_before(first):
                ph = gm.graph.placeholder("w_" + wname.replace(".", "_"))
            ph.meta["val"] = None
            seen[wname] = ph
            names.append(wname)
        node.replace_all_uses_with(seen[wname])
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    # Drop the now-unused parameters (and weight buffers) so the artifact does not embed them.
    for p in params:
        _delete_attr(gm, p)
    return names


def _delete_attr(m: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    for a in path:
        m = getattr(m, a, None)
        if m is None:
            return
    if leaf in m._parameters:
        del m._parameters[leaf]
    elif leaf in m._buffers:
        del m._buffers[leaf]


def lower(gm: fx.GraphModule, example_inputs: list[torch.Tensor], out_path: Path,
          backend: str, tp: int = 1, cache=None) -> bool:
    """Export the (weight-lifted) graph and compile it to `out_path`. `tp`: the ranks of the
    process group its collectives run on (`collective_group`). `cache`: a `GraphCache` the
    artifact is taken from when it holds this program, and kept in otherwise. Returns whether
    it came from the cache."""
    if backend == "onnx":
        from .onnx_export import export_onnx

        export_onnx(gm, example_inputs, out_path)
        return False
    with torch.no_grad():
        ep = torch.export.export(gm, tuple(example_inputs), strict=False)
    if backend == "eager":
        torch.export.save(ep, str(out_path))
        return False
    from torch._inductor import aoti_compile_and_package

    from .graph_cache import program_bytes

    key = cache.key(program_bytes(ep)) if cache is not None else None
    if key is not None and cache.fetch(key, Path(out_path)):
        return True
    with torch.no_grad(), collective_group(tp, has_collectives(ep.graph)), stable_int_array_keys():
        aoti_compile_and_package(ep, package_path=str(out_path), inductor_configs=dict(INDUCTOR_CONFIGS))
    if key is not None:
        cache.store(key, Path(out_path))
    return False


@contextlib.contextmanager
def stable_int_array_keys():
    """Work around an Inductor C++-wrapper bug (torch 2.11-2.13 at least): the wrapper caches
    the names of the size/stride arrays it declares under the id() of the buffer it wrote the
    declaration into, and short-lived buffers die, so a later buffer at the same address is
    handed a name declared nowhere in it ("int_array_52 was not declared in this scope"). It
    depends on addresses, so it strikes at random, more often the larger the graph (an 8B
    verify graph hit it on the GPU). Keeping every buffer the cache has seen alive for the
    lowering makes the ids unique, whichever way the installed version keys its cache."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    except ImportError:
        yield
        return
    classes, todo = [], [CppWrapperCpu]
    while todo:  # the class and every subclass that defines its own method
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "codegen_int_array_var" in cls.__dict__:
            classes.append(cls)
    seen: list = []

    def keep_alive(orig):
        def codegen_int_array_var(self, int_array, writeline, *args, **kwargs):
            seen.append((writeline, getattr(writeline, "__self__", None)))
            return orig(self, int_array, writeline, *args, **kwargs)
        return codegen_int_array_var

    saved = {cls: cls.__dict__["codegen_int_array_var"] for cls in classes}
    for cls, orig in saved.items():
        cls.codegen_int_array_var = keep_alive(orig)
    try:
        yield
    finally:
        for cls, orig in saved.items():
            cls.codegen_int_array_var = orig
        seen.clear()


def has_collectives(graph: fx.Graph) -> bool:
    """Whether the graph calls a functional collective (the tensor-parallel pass's all-reduces)."""
    return any(n.op == "call_function" and getattr(n.target, "namespace", None) == "_c10d_functional"
               for n in graph.nodes)


@contextlib.contextmanager
def collective_group(tp: int, collectives: bool = True):
    """Inductor resolves the process group a collective names (the default one, "0") while it
    lowers it, for its size; a compile runs no ranks, so a graph with collectives is lowered
    with a stand-in group of tp ranks ("fake": no communication) as the default group, unless
    this process is in a real group already. The artifact runs on the real one. (A spawned
    lowering worker is never in one, also when the compile that started it is.)"""
    import torch.distributed as dist

    if not collectives or dist.is_initialized():
        if collectives and tp > 1 and dist.get_world_size() != tp:
            raise SpecCompileError(f"--tp {tp}: compiling inside a process group of "
                                   f"{dist.get_world_size()} ranks; compile outside it")
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        yield
    finally:
        dist.destroy_process_group()


SHARED_MIN_BYTES = 1 << 20  # read-only inputs this large share one buffer in a lowering worker


def _user_inputs(ep) -> list[tuple[torch.Tensor, bool]]:
    """(fake value, shareable) for each user input of an exported program: shareable when the
    graph never writes it and it is at least SHARED_MIN_BYTES (the weights, not the caches)."""
    sig = ep.graph_signature
    user, mutated = set(sig.user_inputs), set(sig.user_inputs_to_mutate.values())
    return [(n.meta["val"], n.name not in mutated and _storage_bytes(n.meta["val"]) >= SHARED_MIN_BYTES)
            for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def _storage_bytes(v) -> int:
    span = 1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride())) if all(s > 0 for s in v.shape) else 0
    return span * v.element_size()


def worker_bytes(ep) -> int:
    """A lowering worker's memory on the device, estimated: the inputs it allocates (each
    written-to or small input, and one buffer the size of the largest read-only one, which all
    read-only ones share: `example_inputs_for`), a quarter more for Inductor's autotuning copies,
    and 2 GiB for the CUDA context and the compiled kernels."""
    ins = _user_inputs(ep)
    own = sum(_storage_bytes(v) for v, shared in ins if not shared)
    shared = max((_storage_bytes(v) for v, shared in ins if shared), default=0)
    return int(1.25 * (own + shared)) + (2 << 30)


def example_inputs_for(ep) -> tuple[torch.Tensor, ...]:
    """Uninitialised example inputs for lowering a loaded program: its shapes, strides and
    dtypes. The read-only large ones (the weights) are views of one buffer the size of the
    largest: their values never matter to the lowering, and a worker of an 8B graph then holds
    1 GB of weights, not 16. The inputs the graph writes (the caches) are their own."""
    ins = _user_inputs(ep)
    need = max((_storage_bytes(v) for v, shared in ins if shared), default=0)
    pool = {}  # device -> the shared buffer (16-byte multiple: any dtype's view of it fits)
    out = []
    for v, shared in ins:
        if shared:
            d = v.device
            if d not in pool:
                pool[d] = torch.empty((need + 15) // 16 * 16, dtype=torch.uint8, device=d)
            out.append(pool[d][: _storage_bytes(v)].view(v.dtype).as_strided(v.shape, v.stride()))
        else:
            out.append(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device))
    return tuple(out)


def save_exported(gm: fx.GraphModule, example_inputs: list[torch.Tensor], path: Path) -> tuple[str, int]:
    """The graph exported and saved for `lower_saved` in another process, without its example
    inputs (the weights and caches, gigabytes at scale): the worker makes uninitialised ones of
    the same shapes, strides and dtypes from the program's metadata. Returns the file and the
    worker's estimated device memory (`worker_bytes`)."""
    from .graph_cache import program_bytes

    with torch.no_grad():
        ep = torch.export.export(gm, tuple(example_inputs), strict=False)
    Path(path).write_bytes(program_bytes(ep))  # what the graph cache keys on, too
    return str(path), worker_bytes(ep)


def lower_saved(src: str, out_path: str, device: str, tp: int = 1) -> str:
    """A worker process's half of `lower`: load a `save_exported` program and compile it with
    Inductor to `out_path`. Imports the op the programs call (spec.tree_attention) first."""
    import spec_compiler.ops.tree_attention  # noqa: F401
    from torch._inductor import aoti_compile_and_package

    if device == "cuda":
        torch.cuda.init()
    ep = torch.export.load(src)
    ep.example_inputs = (example_inputs_for(ep), {})
    try:
        with torch.no_grad(), collective_group(tp, has_collectives(ep.graph)), stable_int_array_keys():
            return aoti_compile_and_package(ep, package_path=out_path,
                                            inductor_configs=dict(INDUCTOR_CONFIGS))
    except Exception as e:  # reaches the parent by pickle: one that does not pickle, as text
        raise picklable(e) from None


def picklable(e: Exception) -> Exception:
    """`e` itself if it survives a pickle round trip, else a RuntimeError with its type, message
    and traceback as text (Inductor's errors can hold frames, which do not pickle)."""
    import pickle
    import traceback

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        text = RuntimeError(f"{type(e).__name__}: {e}")
        text.add_note("".join(traceback.format_exception(e)))
        return text
