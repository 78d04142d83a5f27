"""ENGINE_DIR -> Engine: validate the manifest and fingerprint, load artifacts and weights once,
allocate every state buffer. Loading compiles nothing: Inductor artifacts are AOTInductor
packages, loaded as they are; onnx engines' graphs are ONNX Runtime sessions
(runtime/onnx_runtime.py). Graph interfaces and state come from the engine contract
(`spec_compiler.engine_format`), sized by the manifest's `dims`: the state for the largest
batch bucket, each step graph once per bucket, the prefill graphs at batch 1 (per slot).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spec_compiler import engine_format as fmt
from spec_compiler.config import DraftConfig, Eagle3Config, ModelConfig, draft_config_from_json
from spec_compiler.errors import SpecCompileError
from spec_compiler.export.manifest import read_manifest
from spec_compiler.trees import TreeSpec

log = logging.getLogger("spec_compiler.runtime")


@dataclass
class Graph:
    """One compiled step graph bound to its weights and to the contract's input/output names.

    A graph of batch b reads the first b slots of the state it is given (`state[k][:b]`, a view);
    the runtime passes views it made once (a bucket's prefix, or one slot for prefill), so
    that slice is a no-op on the hot path."""

    name: str
    fn: object
    weights: list[torch.Tensor]
    io: fmt.GraphIO
    batch: int = 1

    def __call__(self, state: dict[str, torch.Tensor], **args: torch.Tensor) -> dict[str, torch.Tensor]:
        def read(name):
            v = state[fmt.state_key(self.name, name)]
            return v if v.shape[0] == self.batch else v[:self.batch]

        vals = [args[t.name] if t.name in self.io.args else read(t.name) for t in self.io.inputs]
        out = self.fn(*self.weights, *vals)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return dict(zip((t.name for t in self.io.outputs), out, strict=True))


@dataclass
class EngineSpec:
    model: ModelConfig
    draft: DraftConfig | Eagle3Config | None
    tree: TreeSpec
    dims: fmt.Dims
    dtype: torch.dtype
    device: str
    backend: str
    manifest: dict = field(repr=False)
    bucket_trees: dict[int, TreeSpec] = field(default_factory=dict)  # batch bucket -> its tree
    rank: int = 0  # this process's tensor-parallel rank (runtime/tp.py)

    @property
    def tp(self) -> int:
        return self.manifest["parallel"]["tp"]

    @property
    def batch_size(self) -> int:
        return self.dims.batch

    @property
    def max_seq_len(self) -> int:
        return self.dims.max_seq_len

    @property
    def prefill_chunk(self) -> int:
        return self.dims.prefill_chunk


def _load_artifact(path: Path, backend: str, device: str, entry: dict, constant: list[torch.Tensor] | None):
    if backend == "onnx":  # the graph's cache rows are written by the runner (return_cache_rows)
        from .onnx_runtime import OnnxRunner

        return OnnxRunner(path, device, entry.get("cache_writes", []), constant)
    if backend == "eager":
        import spec_compiler.ops.tree_attention  # noqa: F401  (the op the program calls)

        return torch.export.load(str(path)).module()
    from .aoti import load_package

    return load_package(path, device)


def read_spec(engine_dir: Path, device: str | None = None) -> EngineSpec:
    """The engine's manifest, checked (schema, torch, fingerprint, device), as an EngineSpec."""
    m = read_manifest(engine_dir)
    device = device or m["device"]
    if device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise SpecCompileError(f"{engine_dir} was built for CUDA but no GPU is visible here; "
                               "rebuild with --device cpu")
    if m["device"] != device.split(":")[0]:
        raise SpecCompileError(f"{engine_dir} was built for {m['device']}, not {device}; rebuild "
                               f"with --device {device}")
    dims = fmt.Dims.from_json(m["dims"])
    tp = m.get("parallel", {}).get("tp") if isinstance(m.get("parallel"), dict) else None
    if type(tp) is not int or tp < 1:
        raise SpecCompileError(f"{engine_dir}: corrupt parallel.tp {tp!r} in its manifest; rebuild the "
                               "engine with spec-compile")
    unknown = set(m["graphs"]) - set(fmt.GRAPHS)
    if unknown:
        raise SpecCompileError(f"{engine_dir}: unknown graphs {sorted(unknown)}; rebuild the engine "
                               "with this spec-compile")
    buckets = fmt.buckets(dims.batch)
    for name, g in m["graphs"].items():
        try:
            have = {int(g.get("batch", 1)), *map(int, g.get("buckets", {}))}
        except (TypeError, ValueError):
            raise SpecCompileError(f"{engine_dir}: graph {name!r} has a corrupt batch or buckets "
                                   "entry; rebuild the engine with spec-compile") from None
        want = set(fmt.graph_batches(dims, name))
        if have != want or m.get("buckets") != list(buckets):
            raise SpecCompileError(f"{engine_dir}: graph {name!r} has batches {sorted(have)}, the "
                                   f"engine's buckets are {list(buckets)} (it needs {sorted(want)}); "
                                   "rebuild the engine with this spec-compile")
    try:
        trees = {b: TreeSpec.from_json(m["bucket_trees"][str(b)]) for b in buckets}
        ok = [trees[b].n_nodes for b in buckets] == list(dims.bucket_nodes)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise SpecCompileError(f"{engine_dir}: bucket_trees do not match the buckets' tree sizes; "
                               "rebuild the engine with this spec-compile")
    return EngineSpec(ModelConfig.from_json(m["model"]),
                      draft_config_from_json(m["draft"]) if m["draft"] else None,
                      TreeSpec.from_json(m["tree"]), dims, fmt.DTYPES[m["dtype"]], device,
                      m["backend"], m, trees)


def check_memory(engine_dir: Path, spec: EngineSpec) -> int:
    """The engine's state (KV caches and per-slot buffers for --max-batch slots,
    engine_format.state_bytes) and its weights must fit the memory they are loaded into (free
    GPU memory; on CPU the machine's memory): else one line with the numbers. Returns the
    state's bytes."""
    from spec_compiler.config import device_memory

    need = fmt.state_bytes(spec.dims)
    try:
        weights = (engine_dir / fmt.weights_file(spec.rank, spec.tp)).stat().st_size
    except OSError:  # reported by the weights' load, with its own message
        weights = 0
    if spec.device.startswith("cuda"):
        have, where = torch.cuda.mem_get_info(torch.device(spec.device))[0], f"free on {spec.device}"
    else:
        have, where = device_memory("cpu")
    if need + weights > have:
        d = spec.dims
        raise SpecCompileError(
            f"{engine_dir}: its state for {d.batch} slots (--max-batch {d.batch}, --max-seq-len "
            f"{d.max_seq_len}: KV caches and per-slot buffers, {need / 2**30:.2f} GiB) and its "
            f"weights ({weights / 2**30:.2f} GiB) need more than the {have / 2**30:.2f} GiB of "
            f"{where}; rebuild it with a smaller --max-batch or --max-seq-len")
    return need


def load(engine_dir: str | Path, device: str | None = None):
    """Load an engine built by spec-compile. Raises SpecCompileError on any mismatch."""
    from safetensors.torch import load_file

    from .generate import Engine

    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise SpecCompileError(f"engine {engine_dir} does not exist; build it with spec-compile")
    t = [time.perf_counter()]
    spec = read_spec(engine_dir, device)  # hashes every file (the fingerprint)
    if spec.tp > 1:  # this rank's weights, on its GPU
        from .tp import rank_of

        cuda = spec.device.startswith("cuda")
        spec = dataclasses.replace(spec, rank=rank_of(engine_dir, spec.tp), device=spec.device if device or not cuda
                                   else f"cuda:{torch.cuda.current_device()}")
    state_bytes = check_memory(engine_dir, spec)
    t.append(time.perf_counter())
    weights = load_file(str(engine_dir / fmt.weights_file(spec.rank, spec.tp)), device=spec.device)
    t.append(time.perf_counter())
    graphs: dict[int, dict[str, Graph]] = {}  # batch -> name -> graph
    constant = frozenset()  # the graphs whose weights are session constants (onnx on the CPU)
    if spec.backend == "onnx" and not spec.device.startswith("cuda"):
        from .onnx_runtime import PREPACKED, prepack_fits  # the decode graphs' matmul weights

        sessions = sum(1 + len(g.get("buckets", {})) for name, g in spec.manifest["graphs"].items()
                       if name in PREPACKED)
        if prepack_fits(sum(w.numel() * w.element_size() for w in weights.values()), sessions):
            constant = PREPACKED
    for name, g in spec.manifest["graphs"].items():
        for b, entry in [(int(g.get("batch", 1)), g), *((int(k), e) for k, e in g.get("buckets", {}).items())]:
            ws = [weights[w] for w in entry["weights"]]
            fn = _load_artifact(engine_dir / entry["file"], spec.backend, spec.device, entry,
                                ws if name in constant else None)
            io = fmt.graph_io(fmt.graph_dims(spec.dims, name, b), name)
            graphs.setdefault(b, {})[name] = Graph(name, fn, ws, io, b)
    t.append(time.perf_counter())
    state = {t.name: t.empty(spec.device) for t in fmt.state(spec.dims)}
    tdir = engine_dir / fmt.TOKENIZER_DIR
    tok = tdir if any((tdir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else None
    engine = Engine(spec, graphs, state, tok)
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize()
    t.append(time.perf_counter())
    engine.load_seconds = {"check": t[1] - t[0], "weights": t[2] - t[1], "graphs": t[3] - t[2],
                           "state": t[4] - t[3], "total": t[4] - t[0]}
    engine.state_bytes = state_bytes
    log.info("loaded %s (%d graphs, backend %s, state %.1f MiB for %d slots) in %.2fs", engine_dir,
             sum(map(len, graphs.values())), spec.backend, state_bytes / 2**20, spec.dims.batch,
             t[4] - t[0])
    return engine
