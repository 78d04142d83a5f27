"""The only place that sequences the stages. Read top to bottom:

    load (loading.py) -> trace (trace.py, torch.export) -> run_passes (passes/) -> check against
    the engine contract (engine_format.py) -> lift weights + lower (export/lower.py, Inductor) ->
    write ENGINE_DIR (export/manifest.py), atomically.

What each engine graph takes and returns, and the state the runtime keeps, is defined once in
`engine_format.py`; every built graph is checked against it before lowering. A draft with a
reduced ("hot-token") vocabulary scores only its hot tokens; the draft graph maps the chosen
columns to target ids (unroll_draft), so tree_tokens are target ids either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import fx

from spec_compiler.export.lower import WeightRegistry, lift_weights, lower
from spec_compiler.export.manifest import Manifest, write_manifest
from spec_compiler.passes import default_passes, run_passes
from spec_compiler.passes.infra import outputs, set_outputs

from . import engine_format as fmt
from .chat import check_tokenizer
from .config import CompileConfig, check_machine
from .errors import SpecCompileError
from .fileio import atomic_dir, output_lock
from .loading import DraftSource, load_draft, load_target
from .trace import trace
from .tree_choice import AutoTree


def example(spec: fmt.TensorSpec, device) -> torch.Tensor:
    """An example input: zeros for indices, random values for floats."""
    t = spec.empty(device)
    return t.normal_() if t.is_floating_point() else t


def trace_graph(cfg: CompileConfig, graph: str, module: torch.nn.Module) -> fx.GraphModule:
    """`module` exported for `graph`, before any pass: outputs logits, hidden, caches, plus
    `token_ids` for the draft graph of a reduced-vocabulary draft (its `hot_ids` buffer, the
    target id of each logit column), which unroll_draft maps the top-k columns through."""
    specs = fmt.traced_inputs(fmt.Dims.from_config(cfg), graph)
    names = [t.name for t in specs]
    caches = [n for n in names if n[:2] in ("k_", "v_")]
    dyn = {"tokens": 1, "features": 1, "input_pos": 1} if graph == "draft" else None
    hot = getattr(module, "hot_ids", None) if graph == "draft" else None
    extra = None
    if hot is not None:  # the buffer's path (a wrapper may hold the draft as a submodule)
        extra = {"token_ids": next(n for n, b in module.named_buffers() if b is hot)}
    return trace(module, [example(t, cfg.device) for t in specs], names, ["logits", "hidden", *caches],
                 dynamic_dim=dyn, buffer_outputs=extra)


def build_graph(cfg: CompileConfig, graph: str, module: torch.nn.Module, debug_dir: Path | None,
                label: str | None = None):
    """`graph` traced at batch cfg.batch_size and rewritten; `label` names its debug dumps."""
    gm = trace_graph(cfg, graph, module)
    if graph == "draft_prefill":  # its logits are never used: don't compute them
        set_outputs(gm, {k: v for k, v in outputs(gm).items() if k != "logits"})
    return run_passes(gm, default_passes(graph, cfg.tree, cfg.prefill_chunk), debug_dir, label or graph)


def check_contract(dims: fmt.Dims, graph: str, gm: fx.GraphModule) -> None:
    """The rewritten graph's inputs and outputs (names, shapes, dtypes) are the contract's."""
    def spec(n: fx.Node):
        v = n.meta["val"]
        return (n.target if n.op == "placeholder" else None, tuple(v.shape), fmt.dtype_name(v.dtype))

    ins = [spec(n) for n in gm.graph.nodes if n.op == "placeholder"]
    outs = [(name, *spec(n)[1:]) for name, n in outputs(gm).items()]
    fmt.check_graph(dims, graph, ins, outs, gm.meta.get("mutated_inputs", []))


def compile_engine(cfg: CompileConfig, model_dir: Path, draft_dir: Path | DraftSource | None, out_dir: Path,
                   progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                   debug_dir: Path | None = None, draft_module: torch.nn.Module | None = None,
                   draft_vocab: str | int = "auto", auto_tree: AutoTree | None = None) -> Path:
    """Compile into `out_dir`, atomically: built in a temp dir beside it, renamed at the end,
    under the output lock (`_writing`), taken before anything is loaded.

    `auto_tree` (--tree auto with the draft's acceptance table) replaces cfg.tree, once the
    modules are loaded, by the tree it measures fastest on this device (tree_choice.py); the
    manifest records the candidates (`tree_choice`).
    `draft_vocab` ("auto", "full" or N) picks the draft's vocabulary (`load_draft`). `draft_dir`
    may be a `loading.read_draft` result; its weights are not read again.
    `draft_module` replaces loading `draft_dir` (tests use it for drafts with known behaviour;
    it must follow `EagleDraft.forward`'s calling convention, and may have `hot_ids`)."""
    out_dir = Path(out_dir)
    check_machine(cfg)  # the device and the memory for the engine's state, before loading
    check_tokenizer(model_dir, cfg.model.vocab_size, fmt.TOKENIZER_FILES)  # what spec-run will do
    t0 = time.time()
    with _writing(out_dir):
        progress(f"[1/4] loading {model_dir}" + (f" and draft {draft_dir}" if draft_dir else ""))
        target = load_target(model_dir, cfg.dtype).to(cfg.device)
        draft = draft_module
        if draft is None and draft_dir is not None:
            draft = load_draft(draft_dir, target, cfg.dtype, draft_vocab).to(cfg.device)
        choice = None
        if auto_tree is not None:
            tree, choice = auto_tree.choose(target, draft, cfg.max_seq_len,
                                            lambda depth: fmt.min_capacity(cfg.prefill_chunk, depth), progress)
            cfg = dataclasses.replace(cfg, tree=tree, draft=cfg.draft if tree.n_nodes > 1 else None)
            draft = draft if tree.n_nodes > 1 else None
        return _compile(cfg, target, draft, out_dir, progress, debug_dir, None, model_dir, t0, choice)


def compile_modules(cfg: CompileConfig, target: torch.nn.Module, draft: torch.nn.Module | None,
                    out_dir: Path, progress: Callable[[str], None] = lambda s: None,
                    debug_dir: Path | None = None, graphs: list[str] | None = None,
                    model_dir: Path | None = None, t0: float | None = None,
                    tree_choice: dict | None = None) -> Path:
    """Compile already-built modules (benchmarks use random-weight modules). `graphs` limits
    which step graphs are built (default: all that the tree needs). The manifest records the
    draft vocabulary of the module compiled (`hot_ids`), whatever cfg.draft said."""
    out_dir = Path(out_dir)
    with _writing(out_dir):
        return _compile(cfg, target, draft, out_dir, progress, debug_dir, graphs, model_dir, t0, tree_choice)


@contextlib.contextmanager
def _writing(out_dir: Path):
    """A whole compile to `out_dir`: SIGTERM and SIGHUP raise KeyboardInterrupt (so the cleanup
    below runs, as for Ctrl-C); `fileio.output_lock` is held (a second compile to the same path
    fails at once naming this one's pid; temp dirs of killed compiles are removed; parent
    directories created for it are removed if it fails); `out_dir` must not exist."""
    prev = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live there
        for sig in (signal.SIGTERM, signal.SIGHUP):
            prev[sig] = signal.signal(sig, _raise_interrupt)
    try:
        with output_lock(out_dir):
            if out_dir.exists():
                raise SpecCompileError(f"--out {out_dir} already exists; remove it or choose another path")
            yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


def _compile(cfg, target, draft, out_dir: Path, progress, debug_dir, graphs, model_dir, t0,
             tree_choice=None) -> Path:
    if draft is not None and cfg.draft is not None:
        hot = getattr(draft, "hot_ids", None)
        cfg = dataclasses.replace(cfg, draft=dataclasses.replace(
            cfg.draft, draft_vocab_size=None if hot is None else hot.numel()))
    t0 = time.time() if t0 is None else t0
    with atomic_dir(out_dir) as tmp:
        manifest = _build(cfg, target, draft, tmp, progress, debug_dir, graphs)
        manifest.data["tree_choice"] = tree_choice
        # The checkpoint's name: spec-serve's default model id.
        manifest.data["model_name"] = Path(model_dir).resolve().name if model_dir is not None else None
        for f in fmt.TOKENIZER_FILES if model_dir is not None else ():
            if (Path(model_dir) / f).is_file():
                (tmp / fmt.TOKENIZER_DIR).mkdir(exist_ok=True)
                shutil.copy2(Path(model_dir) / f, tmp / fmt.TOKENIZER_DIR / f)
        write_manifest(tmp, manifest)
    progress(f"done in {time.time() - t0:.0f}s: {out_dir}")
    return out_dir


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _build(cfg: CompileConfig, target, draft, tmp: Path, progress, debug_dir, graphs=None) -> Manifest:
    from safetensors.torch import save_file

    dims = fmt.Dims.from_config(cfg)
    graphs = list(fmt.graphs(dims)) if graphs is None else graphs
    buckets = fmt.buckets(dims.batch)
    # One artifact per (graph, batch): the prefill graphs at batch 1 (per slot), the step graphs
    # at every bucket. Weights are lifted into one registry, so the engine stores them once.
    jobs = [(name, b) for name in graphs
            for b in ((1,) if name in fmt.PREFILL_GRAPHS else buckets)]
    registry = WeightRegistry()
    entries = {}
    for i, (name, b) in enumerate(jobs):
        owner = fmt.owner(name)
        module = draft if owner == "draft" else target
        label = name if b == 1 else f"{name}.b{b}"
        progress(f"[2/4] {label}: export + passes")
        gm = build_graph(dataclasses.replace(cfg, batch_size=b), name, module, debug_dir, label)
        gdims = fmt.graph_dims(dims, name, b)
        check_contract(gdims, name, gm)
        io = fmt.graph_io(gdims, name)
        weights = lift_weights(gm, registry, prefix="draft." if owner == "draft" else "")
        gm = gm.to(cfg.device)
        args = [registry.tensors[w] for w in weights] + [example(t, cfg.device) for t in io.inputs]
        fname = fmt.graph_file(name, b)
        progress(f"[3/4] {label}: lowering with {cfg.backend} ({i + 1}/{len(jobs)})")
        lower(gm, args, tmp / fname, cfg.backend)
        if name not in entries:  # the smallest batch: the graph's entry
            entries[name] = {
                "file": fname, "weights": weights, "batch": b,
                "passes": list(gm.meta.get("passes", [])),
                "pass_counts": dict(gm.meta.get("pass_counts", {})),
            }
        else:  # a larger bucket of a step graph
            entries[name].setdefault("buckets", {})[str(b)] = {"file": fname, "weights": weights}
    progress(f"[4/4] writing weights ({sum(t.numel() for t in registry.tensors.values()) / 1e6:.1f}M params)")
    save_file({k: v.contiguous().cpu() for k, v in registry.tensors.items()}, str(tmp / fmt.WEIGHTS))
    return Manifest.new(cfg, dims, entries)
