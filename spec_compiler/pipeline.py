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
import gc
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import fx

from spec_compiler.export.graph_cache import GraphCache
from spec_compiler.export.lower import WeightRegistry, lift_weights, lower, lower_saved, save_exported
from spec_compiler.export.manifest import Manifest, write_manifest
from spec_compiler.export.onnx_export import check_onnx
from spec_compiler.passes import default_passes, run_passes
from spec_compiler.passes.infra import outputs, set_outputs
from spec_compiler.passes.tensor_parallel import RankWeights, rank_dims, shard_pass

from . import engine_format as fmt
from .chat import check_tokenizer
from .config import CompileConfig, check_machine, usable_cpus
from .errors import SpecCompileError, raise_interrupt
from .fileio import atomic_dir, output_lock
from .loading import DraftSource, load_draft, load_target
from .models.eagle3 import Eagle3Draft
from .trace import trace
from .tree_choice import AutoTree
from .trees import TreeSpec, chain


def example(spec: fmt.TensorSpec, device) -> torch.Tensor:
    """An example input: zeros for indices, random values for floats."""
    t = spec.empty(device)
    return t.normal_() if t.is_floating_point() else t


def trace_graph(cfg: CompileConfig, graph: str, module: torch.nn.Module,
                dims: fmt.Dims | None = None) -> fx.GraphModule:
    """`module` exported for `graph`, before any pass: outputs logits, hidden, caches, plus
    `token_ids` for the draft graph of a reduced-vocabulary draft (its `hot_ids` buffer, the
    target id of each logit column), which unroll_draft maps the top-k columns through."""
    specs = fmt.traced_inputs(dims or fmt.Dims.from_config(cfg), graph)
    if graph == "draft" and isinstance(module, Eagle3Draft):  # its levels read its own features
        specs = [dataclasses.replace(t, shape=(*t.shape[:2], module.cfg.layer.hidden_size))
                 if t.name == "features" else t for t in specs]
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
                label: str | None = None, dims: fmt.Dims | None = None):
    """`graph` traced at batch cfg.batch_size for tree cfg.tree and rewritten; `label` names its
    debug dumps; `dims` (default: cfg's) are the engine's as this graph sees them
    (`fmt.graph_dims`: the step state's width and the caches' rows are the engine's)."""
    gm = trace_graph(cfg, graph, module, dims)
    width = None if dims is None else dims.tree_depth + 1
    if graph == "draft_prefill":  # its logits are never used: don't compute them
        set_outputs(gm, {k: v for k, v in outputs(gm).items() if k != "logits"})
    project = module.fc if graph == "draft" and isinstance(module, Eagle3Draft) else None
    passes = default_passes(graph, cfg.tree, cfg.prefill_chunk, width, project, shard_pass(cfg, graph),
                            in_place=cfg.backend != "onnx")
    return run_passes(gm, passes, debug_dir, label or graph)


def check_contract(dims: fmt.Dims, graph: str, gm: fx.GraphModule) -> None:
    """The rewritten graph's inputs and outputs (names, shapes, dtypes) are the contract's (an
    ONNX graph's cache rows, `return_cache_rows`, come after them and are not the contract's)."""
    def spec(n: fx.Node):
        v = n.meta["val"]
        return (n.target if n.op == "placeholder" else None, tuple(v.shape), fmt.dtype_name(v.dtype))

    ins = [spec(n) for n in gm.graph.nodes if n.op == "placeholder"]
    rows = {name for w in gm.meta.get("cache_writes", ()) for name in w[1:]}
    outs = [(name, *spec(n)[1:]) for name, n in outputs(gm).items() if name not in rows]
    fmt.check_graph(dims, graph, ins, outs, gm.meta.get("mutated_inputs", []))


def compile_engine(cfg: CompileConfig, model_dir: Path, draft_dir: Path | DraftSource | None, out_dir: Path,
                   progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                   debug_dir: Path | None = None, draft_module: torch.nn.Module | None = None,
                   draft_vocab: str | int = "auto", auto_tree: AutoTree | None = None,
                   jobs: int | None = None, measured_dispatch: bool = True) -> Path:
    """Compile into `out_dir`, atomically: built in a temp dir beside it, renamed at the end,
    under the output lock (`_writing`), taken before anything is loaded.

    `auto_tree` (--tree auto with the draft's acceptance table) replaces cfg.tree, once the
    modules are loaded, by a tree per batch bucket, each the one it measures fastest at that
    bucket on this device (tree_choice.py; chain-0 where speculation does not pay); the
    manifest records the candidates per bucket (`tree_choice`).
    `jobs`: processes that lower graphs in parallel (`lower_all`).
    `measured_dispatch` (with `auto_tree`, at tp 1): every speculating bucket is also built with
    plain decoding, and with a smaller tree where the cost model cannot tell the two apart
    (`tree_alternates`), and keeps what its compiled steps make fastest (`measure_dispatch`).
    `draft_vocab` ("auto", "full" or N) picks the draft's vocabulary (`load_draft`). `draft_dir`
    may be a `loading.read_draft` result; its weights are not read again.
    `draft_module` replaces loading `draft_dir` (tests use it for drafts with known behaviour;
    it must follow `EagleDraft.forward`'s calling convention, and may have `hot_ids`)."""
    out_dir = Path(out_dir)
    check_machine(cfg)  # the device and the memory for the engine's state, before loading
    if cfg.backend == "onnx":
        check_onnx(cfg)  # its packages and dtype
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
            trees, choice = auto_tree.choose_buckets(
                target, draft, cfg.max_seq_len, lambda depth: fmt.min_capacity(cfg.prefill_chunk, depth),
                fmt.buckets(cfg.batch_size), progress)
            measured = measured_dispatch and cfg.tp == 1
            if measured:
                trees = measured_trees(trees, choice, progress)
            cfg = with_bucket_trees(cfg, trees)
            draft = draft if cfg.draft is not None else None
            if measured and cfg.draft is not None:
                cfg = dataclasses.replace(cfg, plain_alternates=True,
                                          tree_alternates=tree_alternates(trees, choice, progress))
        return _compile(cfg, target, draft, out_dir, progress, debug_dir, None, model_dir, t0, choice, jobs)


def measured_trees(trees: tuple, choice: dict, progress: Callable[[str], None] = lambda s: None) -> tuple:
    """The trees to build for measured dispatch from the cost model's per-bucket `trees` (and its
    record `choice`, which notes each substitution): in an engine that has a draft anyway (some
    bucket speculates), a bucket where the cost model chose chain-0 is built with its best
    speculative candidate instead, so that the compiled steps decide there too (the plain
    alternate is built beside every speculating bucket). The cost model times uncompiled
    forwards, and its error runs both ways: on the 8B shape on an H200 it predicted about 1.8x
    the compiled steps' times and chose chain-0 at batch 64. An engine with no speculating
    bucket stays plain: no draft graph is built to find out."""
    if all(t.n_nodes == 1 for t in trees):
        return tuple(trees)
    out = []
    for b, t in zip(choice["buckets"], trees, strict=True):  # bucket by bucket, in order
        rec = choice["buckets"][b]
        best = next((r for r in rec["candidates"] if r["nodes"] > 1), None)
        if t.n_nodes == 1 and best is not None:
            t = TreeSpec.from_json(best)
            rec["measured_candidate"] = best["name"]
            progress(f"[tree] batch {b}: the cost model prefers plain decoding; {best['name']} is built "
                     "too, and measured dispatch decides")
        out.append(t)
    return tuple(out)


# How close (as a fraction of predicted tokens/s) a smaller tree must come to the cost model's
# choice for measured dispatch to build and time it too (`tree_alternates`).
ALTERNATE_MARGIN = 0.05


def tree_alternates(trees: tuple, choice: dict,
                    progress: Callable[[str], None] = lambda s: None) -> tuple | None:
    """Per bucket (buckets order), the smaller tree that measured dispatch builds and times beside
    the bucket's own tree, or None: of the cost model's candidates with fewer nodes (more than
    the root) and the same depth, the one it predicts fastest, if that prediction is within
    ALTERNATE_MARGIN of the bucket tree's. None for all: no bucket has one.
    Why: the cost model times uncompiled forwards, whose fixed cost per step (unfused kernels)
    hides what each further tree node costs the compiled step. On an H200 (SmolLM2-135M and its
    EAGLE-3 head, batch 1) it predicted fitted-96's step 1.1% longer than fitted-64's, where
    the compiled steps differed by 6%: it chose fitted-96, which decoded 1.6% slower than
    fitted-64 (BENCHMARKS.md, ninth GPU run). Same depth only: the engine's state is sized by
    the deepest tree, which a win must not change. The record notes `measured_alternate`."""
    out = []
    for b, t in zip(choice["buckets"], trees, strict=True):
        rec, alt = choice["buckets"][b], None
        cands = rec.get("candidates", [])
        own = next((c for c in cands if c["name"] == t.name and c["nodes"] == t.n_nodes), None)
        if t.n_nodes > 1 and own is not None:
            smaller = [c for c in cands if 1 < c["nodes"] < t.n_nodes and c["depth"] == t.max_depth]
            best = max(smaller, key=lambda c: c["expected_tokens_per_s"], default=None)
            if best is not None and (best["expected_tokens_per_s"]
                                     >= (1 - ALTERNATE_MARGIN) * own["expected_tokens_per_s"]):
                alt = TreeSpec.from_json(best)
                rec["measured_alternate"] = best["name"]
                progress(f"[tree] batch {b}: {best['name']} is predicted within "
                         f"{100 * (1 - best['expected_tokens_per_s'] / own['expected_tokens_per_s']):.1f}% "
                         f"of {t.name}; it is built too, and measured dispatch decides")
        out.append(alt)
    return tuple(out) if any(a is not None for a in out) else None


def with_bucket_trees(cfg: CompileConfig, trees: tuple) -> CompileConfig:
    """cfg building `trees` (one per bucket): `tree` is the deepest (capacity checks), no
    bucket_trees when all are the same, no draft when none speculates."""
    deepest = max(trees, key=lambda t: (t.max_depth, t.n_nodes))
    same = all(t == trees[0] for t in trees)
    spec = any(t.n_nodes > 1 for t in trees)
    return dataclasses.replace(cfg, tree=trees[0] if same else deepest,
                               bucket_trees=None if same else tuple(trees),
                               draft=cfg.draft if spec else None)


def compile_modules(cfg: CompileConfig, target: torch.nn.Module, draft: torch.nn.Module | None,
                    out_dir: Path, progress: Callable[[str], None] = lambda s: None,
                    debug_dir: Path | None = None, graphs: list[str] | None = None,
                    model_dir: Path | None = None, t0: float | None = None,
                    tree_choice: dict | None = None, jobs: int | None = None) -> Path:
    """Compile already-built modules (benchmarks use random-weight modules). `graphs` limits
    which step graphs are built (default: all that the tree needs). The manifest records the
    draft vocabulary of the module compiled (`hot_ids`), whatever cfg.draft said."""
    out_dir = Path(out_dir)
    with _writing(out_dir):
        return _compile(cfg, target, draft, out_dir, progress, debug_dir, graphs, model_dir, t0,
                        tree_choice, jobs)


@contextlib.contextmanager
def _writing(out_dir: Path):
    """A whole compile to `out_dir`: SIGTERM and SIGHUP raise KeyboardInterrupt (so the cleanup
    below runs, as for Ctrl-C); `fileio.output_lock` is held (a second compile to the same path
    fails at once naming this one's pid; temp dirs of killed compiles are removed; parent
    directories created for it are removed if it fails); `out_dir` must not exist."""
    prev = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live there
        for sig in (signal.SIGTERM, signal.SIGHUP):
            prev[sig] = signal.signal(sig, raise_interrupt)
    try:
        with output_lock(out_dir):
            if out_dir.exists():
                raise SpecCompileError(f"--out {out_dir} already exists; remove it or choose another path")
            yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


def _compile(cfg, target, draft, out_dir: Path, progress, debug_dir, graphs, model_dir, t0,
             tree_choice=None, jobs=None) -> Path:
    if draft is not None and cfg.draft is not None:
        hot = getattr(draft, "hot_ids", None)
        cfg = dataclasses.replace(cfg, draft=dataclasses.replace(
            cfg.draft, draft_vocab_size=None if hot is None else hot.numel()))
    t0 = time.time() if t0 is None else t0
    with atomic_dir(out_dir) as tmp:
        with _feature_layers(cfg, target):
            manifest = _build(cfg, target, draft, tmp, progress, debug_dir, graphs, jobs)
        manifest.data["tree_choice"] = tree_choice
        if manifest.data.get("plain_alternates"):
            measure_dispatch(manifest, tmp, progress)
        # The checkpoint's name: spec-serve's default model id.
        manifest.data["model_name"] = Path(model_dir).resolve().name if model_dir is not None else None
        for f in fmt.TOKENIZER_FILES if model_dir is not None else ():
            if (Path(model_dir) / f).is_file():
                (tmp / fmt.TOKENIZER_DIR).mkdir(exist_ok=True)
                shutil.copy2(Path(model_dir) / f, tmp / fmt.TOKENIZER_DIR / f)
        write_manifest(tmp, manifest)
    progress(f"done in {time.time() - t0:.0f}s: {out_dir}")
    return out_dir


def step_ms(engine, batch: int, steps: int = 12) -> float:
    """Median wall ms of one `Engine.step` with `batch` live greedy slots (that bucket's step, one
    CUDA-graph replay on a GPU) from a random context: what a decoding step costs the runtime,
    its host side included."""
    d = engine.dims
    ctx = max(1, min(128, (d.max_seq_len - d.step_slots) // 2))
    cuda = engine.spec.device.startswith("cuda")
    engine.start_synthetic(ctx, batch=batch)
    engine.capture()  # CUDA: every bucket's step captured before timing (a no-op on the CPU)
    engine.start_synthetic(ctx, batch=batch)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t))
    engine._free_all()
    return sorted(times)[len(times) // 2]


def measure_dispatch(manifest: Manifest, tmp: Path, progress, time_step=None) -> None:
    """--tree auto's cost model ranks trees by timing the uncompiled modules, which overstates
    every step's fixed cost (unfused kernels): speculation looks cheaper next to plain decoding
    than it is in the compiled engine, and a further tree node cheaper than it is. So each
    speculating bucket was also built with plain decoding (`plain_alternates`) and, where
    `tree_alternates` named one, with a smaller tree of the same depth. Here the compiled steps
    are timed at that bucket (the engine loaded from `tmp` once per view) and the bucket keeps
    whichever gives the most tokens per ms: a tree's expected tokens per call (the draft's
    acceptance table) / its step, or one token / the plain step (a tie goes to plain decoding,
    then to the cost model's tree). Rewrites `manifest` to the winners (bucket_trees, dims,
    graph entries, the `tree_choice` record) and deletes the losers' artifacts."""
    from spec_compiler.runtime import Engine

    time_step = time_step or step_ms
    data = manifest.data
    plain_alts = data.pop("plain_alternates")
    tree_alts = data.pop("tree_alternates", None) or {"trees": {}, "graphs": {}}
    dims = fmt.Dims.from_json(data["dims"])
    spec_buckets = [b for b in fmt.buckets(dims.batch) if dims.speculates(b)]
    alt_buckets = [b for b in spec_buckets if str(b) in tree_alts["trees"]]
    views = {"plain": (_to_plain(data, plain_alts, spec_buckets), spec_buckets),
             "speculative": (data, spec_buckets)}
    if alt_buckets:
        views["alternate"] = (_to_tree(data, tree_alts, alt_buckets), alt_buckets)
    times = {}
    for view, (body, at) in views.items():
        write_manifest(tmp, Manifest(body))
        engine = Engine.load(tmp)
        times[view] = {b: time_step(engine, b) for b in at}
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record = data.get("tree_choice") or {}
    win = {}
    for b in spec_buckets:
        tree = data["bucket_trees"][str(b)]
        tpc = _expected_tokens_per_call(record, b, tree["name"])
        spec_ms, plain_ms = times["speculative"][b], times["plain"][b]
        names = {"plain": "chain-0", "speculative": tree["name"]}
        rates = {"plain": 1.0 / plain_ms, "speculative": tpc / spec_ms}  # max: the first on a tie
        measured = {"speculative_step_ms": round(spec_ms, 4), "plain_step_ms": round(plain_ms, 4),
                    "expected_tokens_per_call": round(tpc, 4), "tree": tree["name"]}
        line = f"{tree['name']} {tpc:.2f} tokens/call expected in a {spec_ms:.2f} ms step"
        if b in alt_buckets:
            alt = tree_alts["trees"][str(b)]["name"]
            alt_tpc, alt_ms = _expected_tokens_per_call(record, b, alt), times["alternate"][b]
            names["alternate"], rates["alternate"] = alt, alt_tpc / alt_ms
            measured["alternate"] = {"tree": alt, "step_ms": round(alt_ms, 4),
                                     "expected_tokens_per_call": round(alt_tpc, 4)}
            line += f", {alt} {alt_tpc:.2f} in {alt_ms:.2f} ms"
        win[b] = max(rates, key=rates.get)
        measured.update(speculate=win[b] != "plain", chosen=names[win[b]])
        verdict = {"plain": "decodes plainly", "speculative": f"keeps {tree['name']}",
                   "alternate": f"takes {names.get('alternate')}"}[win[b]]
        progress(f"[dispatch] batch {b}: {line}, plain decoding 1 in {plain_ms:.2f} ms: {verdict}")
        record.setdefault("buckets", {}).setdefault(str(b), {})["measured"] = measured
        record.setdefault("choice", {})[str(b)] = names[win[b]]
    final = _to_tree(data, tree_alts, [b for b in alt_buckets if win[b] == "alternate"])
    final = _to_plain(final, plain_alts, [b for b in spec_buckets if win[b] == "plain"])
    final["tree_choice"] = record or None
    built = _graph_files(data["graphs"]) | {e["file"] for alts in (plain_alts, tree_alts["graphs"])
                                           for by_bucket in alts.values() for e in by_bucket.values()}
    for f in built - _graph_files(final["graphs"]):  # the losers' artifacts
        (tmp / f).unlink(missing_ok=True)
    manifest.data = final
    fmt.Dims.from_json(final["dims"])  # consistent (bucket_nodes, tree_nodes)


def _to_tree(data: dict, tree_alts: dict, tree_buckets: list[int]) -> dict:
    """A copy of manifest body `data` in which `tree_buckets` run their alternative tree
    (`tree_alts`, as `_build` records it): its draft and verify entries, its tree, its nodes in
    dims; the manifest's `tree` stays the deepest bucket tree (the largest of equal depth)."""
    import json

    out = json.loads(json.dumps(data))
    for b in tree_buckets:
        for name, by_bucket in tree_alts["graphs"].items():
            _set_entry(out["graphs"], name, b, by_bucket[str(b)])
        tree = TreeSpec.from_json(tree_alts["trees"][str(b)])
        out["bucket_trees"][str(b)] = tree.to_json()
        out["dims"] = fmt.nodes_at(fmt.Dims.from_json(out["dims"]), b, tree.n_nodes).to_json()
    if tree_buckets:
        trees = [TreeSpec.from_json(t) for t in out["bucket_trees"].values()]
        out["tree"] = max(trees, key=lambda t: (t.max_depth, t.n_nodes)).to_json()
    return out


def _to_plain(data: dict, alternates: dict, plain_buckets: list[int]) -> dict:
    """A copy of manifest body `data` in which `plain_buckets` decode plainly: their verify
    entries are the plain alternatives, their draft entries gone, their trees chain-0."""
    import json

    out = json.loads(json.dumps(data))
    for b in plain_buckets:
        for name, by_bucket in alternates.items():
            _set_entry(out["graphs"], name, b, by_bucket[str(b)])
        _drop_entry(out["graphs"], "draft", b)
        out["bucket_trees"][str(b)] = chain(0).to_json()
        out["dims"] = fmt.plain_at(fmt.Dims.from_json(out["dims"]), b).to_json()
    return out


def _graph_files(graphs: dict) -> set[str]:
    """The artifact files a manifest's `graphs` name (every graph at every bucket)."""
    return {e["file"] for g in graphs.values() for e in [g, *g.get("buckets", {}).values()]}


def _set_entry(graphs: dict, name: str, b: int, entry: dict) -> None:
    g = graphs[name]
    if int(g.get("batch", 1)) == b:
        g.update(entry)
        if "cache_writes" not in entry:
            g.pop("cache_writes", None)
    else:
        g["buckets"][str(b)] = entry


def _drop_entry(graphs: dict, name: str, b: int) -> None:
    """Remove graph `name`'s artifact at bucket b (the smallest bucket's entry is the graph's
    own: the next bucket's takes its place)."""
    g = graphs.get(name)
    if g is None:
        return
    if int(g.get("batch", 1)) != b:
        g.get("buckets", {}).pop(str(b), None)
        return
    rest = g.get("buckets", {})
    if not rest:
        del graphs[name]
        return
    nb = min(rest, key=int)
    head = rest.pop(nb)
    for k in ("file", "weights", "cache_writes"):
        g.pop(k, None)
    g.update(head)
    g["batch"] = int(nb)
    if not rest:
        g.pop("buckets", None)


def _expected_tokens_per_call(record: dict, b: int, tree_name: str) -> float:
    """The bucket tree's expected tokens per call in the --tree auto record (the acceptance
    table's estimate)."""
    for c in record.get("buckets", {}).get(str(b), {}).get("candidates", []):
        if c.get("name") == tree_name:
            return float(c["expected_tokens_per_call"])
    raise SpecCompileError(f"measured dispatch: no expected tokens per call for {tree_name} at batch "
                           f"{b} in the tree choice record; this is a compiler bug")


@contextlib.contextmanager
def _feature_layers(cfg: CompileConfig, target):
    """While the graphs are built, the target returns as its features what the draft reads: an
    EAGLE-3 draft's fused layers (the manifest's draft entry records which), else the final
    normed hidden state."""
    speculates = cfg.draft is not None and any(t.n_nodes > 1 for t in cfg.trees())
    fused = cfg.draft.fused_layers if speculates else ()
    if fused and cfg.draft.layer.hidden_size != cfg.model.hidden_size:
        raise SpecCompileError(f"EAGLE-3 draft hidden size {cfg.draft.layer.hidden_size} differs from the "
                               f"target's {cfg.model.hidden_size}: not supported yet")
    before = getattr(target, "feature_layers", ())
    target.feature_layers = fused
    try:
        yield
    finally:
        target.feature_layers = before


def _build(cfg: CompileConfig, target, draft, tmp: Path, progress, debug_dir, graphs=None,
           jobs: int | None = None) -> Manifest:
    from safetensors.torch import save_file

    dims = fmt.Dims.from_config(cfg)
    local = rank_dims(dims, cfg.tp)  # what each rank's graphs take and its state (== dims at TP 1)
    graphs = list(fmt.graphs(dims)) if graphs is None else graphs
    buckets, trees = fmt.buckets(dims.batch), cfg.trees()
    # One artifact per (graph, batch): the prefill graphs at batch 1 (per slot), verify at every
    # bucket with that bucket's tree, draft at the buckets that speculate. Weights are lifted
    # into one registry, so the engine stores them once. Export and passes run here, one graph
    # after another; the lowering (Inductor, most of the time) runs in parallel (`Lowering`).
    # Measured dispatch's alternatives (`measure_dispatch`) beside each speculating bucket's
    # graphs: plain decoding's verify graphs, and a smaller tree's draft and verify graphs where
    # `tree_alternates` names one. An alternative sees the engine as `fmt.nodes_at` (its nodes
    # at that bucket, the state unchanged).
    alts = dict(zip(buckets, cfg.tree_alternates or ()))
    todo = [(name, b, None) for name in graphs for b in fmt.graph_batches(dims, name)]
    if cfg.plain_alternates:
        todo += [(name, b, "plain") for name in ("verify", "verify_sampled") if name in graphs
                 for b in buckets if dims.speculates(b)]
    todo += [(name, b, "alt") for name in ("draft", "verify", "verify_sampled") if name in graphs
             for b in buckets if alts.get(b) is not None and dims.speculates(b)]
    registry = WeightRegistry()
    entries, alternates = {}, {"plain": {}, "alt": {}}
    lowering = Lowering(cfg.backend, cfg.device, jobs, len(todo), progress, cfg.tp)
    shards = RankWeights()
    try:
        for name, b, variant in todo:
            owner = fmt.owner(name)
            module = draft if owner == "draft" else target
            tree = chain(0) if variant == "plain" else alts[b] if variant == "alt" else trees[buckets.index(b)]
            label = (name if b == 1 else f"{name}.b{b}") + (f" ({'plain' if variant == 'plain' else tree.name})"
                                                              if variant else "")
            progress(f"[2/4] {label}: export + passes")
            bcfg = dataclasses.replace(cfg, batch_size=b, tree=tree, bucket_trees=None)

            def view(d: fmt.Dims) -> fmt.Dims:  # the engine as this graph sees it
                return fmt.graph_dims(fmt.nodes_at(d, b, tree.n_nodes) if variant else d, name, b)

            gm = build_graph(bcfg, name, module, debug_dir, label, view(dims))
            rdims = view(local)  # a rank's graph
            check_contract(rdims, name, gm)
            io = fmt.graph_io(rdims, name)
            weights = lift_weights(gm, registry, prefix="draft." if owner == "draft" else "")
            shards.add(gm)
            gm = gm.to(cfg.device)
            args = [registry.tensors[w] for w in weights] + [example(t, cfg.device) for t in io.inputs]
            fname = fmt.graph_file(name + (f".{variant}" if variant else ""), b,
                                   "onnx" if cfg.backend == "onnx" else "pt2")
            entry = {"file": fname, "weights": weights}
            if "cache_writes" in gm.meta:  # the runtime writes these rows (return_cache_rows)
                entry["cache_writes"] = gm.meta["cache_writes"]
            if variant:
                alternates[variant].setdefault(name, {})[str(b)] = entry
            elif name not in entries:  # the smallest batch: the graph's entry
                entries[name] = {**entry, "batch": b, "passes": list(gm.meta.get("passes", [])),
                                 "pass_counts": dict(gm.meta.get("pass_counts", {}))}
            else:  # a larger bucket of a step graph
                entries[name].setdefault("buckets", {})[str(b)] = entry
            lowering.add(label, gm, args, tmp / fname)
            del gm, args  # not held for every graph (the caches are gigabytes at scale)
        lowering.finish()
    finally:
        lowering.close()
    progress(f"[4/4] writing weights ({sum(t.numel() for t in registry.tensors.values()) / 1e6:.1f}M params)")
    for rank in range(cfg.tp):
        save_file({k: v.contiguous().cpu() for k, v in shards.of(registry, rank).items()},
                  str(tmp / fmt.weights_file(rank, cfg.tp)))
    manifest = Manifest.new(cfg, local, entries)
    if alternates["plain"]:  # read and removed by measure_dispatch
        manifest.data["plain_alternates"] = alternates["plain"]
    if alternates["alt"]:
        manifest.data["tree_alternates"] = {
            "trees": {b: alts[int(b)].to_json() for b in alternates["alt"]["verify"]},
            "graphs": alternates["alt"]}
    return manifest


HEARTBEAT_S = 60.0  # seconds between "still lowering" lines while no graph finishes


class Lowering:
    """Lowers the engine's graphs as they are built. Why in parallel: an engine has one verify
    (and draft, verify_sampled) per batch bucket, so --max-batch 64 is 7 buckets x up to 4
    graphs, and Inductor's lowering (code generation in Python, then the C++/Triton compilers)
    is most of the compile time and single-threaded per graph: lowering one graph after another
    makes the compile time grow with the bucket count. With `jobs` > 1 each graph is exported
    here as soon as it is built (cheap), saved, and lowered in its own worker process
    (`export.lower.lower_saved`: a spawned interpreter, safe with CUDA) while the next graph is
    built, `jobs` at a time; the example inputs (weights and caches) are dropped at once, not
    held for every graph. Default jobs: one per 2 usable CPU cores, at most 8: a worker is mostly
    single-threaded Python and C++ compiling (on an H200 machine an 8B-shape verify graph at TP 2
    took 193 s lowered alone with 16 cores free; the 8B verify graphs about 140 s each with four
    lowering at once). 1, or
    the eager and onnx backends (an ONNX export takes seconds), lower in this process as before.
    Each worker allocates uninitialised example inputs of its graph (`export.lower.
    example_inputs_for`): the caches it writes, and one buffer that all its read-only weights
    view. On a GPU the workers share its memory, so a graph is started only while the running
    workers' estimated needs (`export.lower.worker_bytes`: those inputs, plus a margin for the
    CUDA context and Inductor's autotuning buffers) fit what was free when the first one
    started, less room for this process to build the next graphs (four workers each holding a
    full copy of the 8B weights, and the parent, ran an H200 out of memory); a graph that fits
    nowhere still runs, alone.
    The alternative, one artifact with a dynamic batch dimension and a CUDA graph captured per
    bucket, would compile each graph once, but its kernels would be tuned for no batch in
    particular and the CPU engines (no CUDA graphs) would pay dynamic shapes on every call; the
    artifacts here stay static per bucket."""

    def __init__(self, backend: str, device: str, jobs: int | None, total: int, progress, tp: int = 1):
        self.backend, self.device, self.total, self.progress = backend, device, total, progress
        self.tp = tp  # graphs with collectives are lowered with a stand-in group of tp ranks
        self.jobs = min(8, max(1, usable_cpus() // 2)) if jobs is None else jobs
        self.parallel = backend == "inductor" and self.jobs > 1 and total > 1
        self.pool, self.futures, self.done = None, {}, 0
        self.submitted, self.started, self.last_done = {}, {}, 0.0  # for the "still lowering" lines
        self.budget, self.needs = None, {}  # GPU bytes the workers may use; each running one's estimate
        self.cache = GraphCache.for_lowering(backend, device, tp)

    def add(self, label: str, gm: fx.GraphModule, args: list[torch.Tensor], path: Path) -> None:
        if not self.parallel:
            self.done += 1
            self.progress(f"[3/4] {label}: lowering with {self.backend} ({self.done}/{self.total})")
            if lower(gm, args, path, self.backend, self.tp, self.cache):
                self.progress(f"[3/4] {label}: taken from the graph cache ({self.done}/{self.total})")
            return
        src, need = save_exported(gm, args, path.with_suffix(".export.pt2"))
        key = self.cache.key(Path(src).read_bytes()) if self.cache is not None else None
        if key is not None and self.cache.fetch(key, path):
            Path(src).unlink()
            self.done += 1
            self.progress(f"[3/4] {label}: taken from the graph cache ({self.done}/{self.total})")
            return
        if self.pool is None:  # the first graph to lower
            import concurrent.futures as cf
            import multiprocessing

            self.progress(f"[3/4] lowering the graphs with {self.backend}, up to {self.jobs} at a time")
            self.pool = cf.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
            self.budget = gpu_worker_budget(self.device)
        if self.budget is not None:
            while self.needs and sum(self.needs.values()) + need > self.budget:
                self._collect(first=True)
        fut = self.pool.submit(lower_saved, src, str(path), self.device, self.tp)
        self.futures[fut], self.needs[fut] = (label, src, path, key), need
        self.submitted[fut], self.started[fut] = time.monotonic(), None  # see `_still_lowering`

    def _collect(self, first: bool = False) -> None:
        """Wait for the first worker to finish (`first`) or for all; a worker's error is raised.
        While none finishes, a progress line every HEARTBEAT_S names the graphs still lowering
        and for how long (one graph can take minutes)."""
        import concurrent.futures as cf

        failed, pending = None, set(self.futures)
        while pending:
            done, pending = cf.wait(pending, timeout=HEARTBEAT_S, return_when=cf.FIRST_COMPLETED)
            if not done:
                self._still_lowering()
                continue
            for fut in done:  # a failure is raised after the others finished (and were cached)
                label, src, path, key = self.futures.pop(fut)
                self.needs.pop(fut, None)
                self.started.pop(fut, None)
                self.submitted.pop(fut, None)
                self.last_done = time.monotonic()
                if fut.exception() is not None:
                    failed = failed or (label, fut.exception())
                    continue
                Path(src).unlink()
                if key is not None:
                    self.cache.store(key, path)
                self.done += 1
                self.progress(f"[3/4] {label}: lowered ({self.done}/{self.total})")
            if first:
                break
        if failed is not None:
            label, e = failed
            raise RuntimeError(f"lowering the graph {label} with {self.backend} failed: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e

    def _still_lowering(self) -> None:
        """One progress line: each graph a worker is lowering, and since when. A queued graph
        starts when it is submitted to a free worker or when a graph finishes and frees one."""
        now = time.monotonic()
        for fut in self.futures:
            if self.started.get(fut) is None and fut.running():
                self.started[fut] = max(self.submitted[fut], self.last_done)
        running = [(now - t, self.futures[f][0]) for f, t in self.started.items() if t is not None]
        if running:
            self.progress("[3/4] still lowering: " + ", ".join(
                f"{label} ({secs:.0f} s)" for secs, label in sorted(running, reverse=True)))

    def finish(self) -> None:
        """Wait for every worker; a worker's error is raised here."""
        if self.pool is not None:
            self._collect()

    def close(self) -> None:
        """Stop the workers (after an error or an interrupt: queued graphs are dropped)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def gpu_worker_budget(device: str) -> int | None:
    """GPU bytes the lowering workers may hold together: what is free now, less a tenth of the
    card (at least 8 GiB) that this process keeps for building the next graphs. None off CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    gc.collect()  # what an earlier step (the tree choice's timed captures) left, then its cached blocks
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return free - max(total // 10, 8 << 30)


def lower_all(todo: list, backend: str, device: str, jobs: int | None, progress) -> None:
    """Lower every (label, gm, example args, path) with `Lowering`."""
    sink = Lowering(backend, device, jobs, len(todo), progress)
    try:
        for job in todo:
            sink.add(*job)
        sink.finish()
    finally:
        sink.close()
