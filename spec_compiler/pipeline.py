"""The only place that sequences the stages. Read top to bottom:

    load (loading.py) -> trace (trace.py, torch.export) -> run_passes (passes/) -> lift weights +
    lower (export/lower.py, Inductor) -> write ENGINE_DIR (export/manifest.py), atomically.

Engine graphs (B = batch bucket, C = prefill chunk, T = tree nodes, D = tree depth):
    prefill        target over C prompt tokens        (tokens, cache_len, k_*, v_*) -> logits, hidden
    draft_prefill  draft over the C prompt pairs      (tokens, features, cache_len, k_*, v_*) -> hidden
    draft          catch-up + unrolled tree levels    (acc_tokens, acc_feats, n_acc, cache_len, k_*, v_*)
                                                      -> tree_tokens
    verify         target over the tree + accept      (tokens, cache_len, k_*, v_*)
                                                      -> acc_tokens, acc_feats, n_acc, cache_len
Caches are updated in place (static_kv_cache). A root-only tree (chain-0) has no draft graphs:
verify is then plain one-token decoding. A draft with a reduced ("hot-token") vocabulary scores
only its hot tokens; the draft graph maps the chosen columns to target ids (unroll_draft), so
tree_tokens are target ids either way.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import fx

from spec_compiler.export.lower import WeightRegistry, lift_weights, lower
from spec_compiler.export.manifest import Manifest, write_manifest
from spec_compiler.passes import default_passes, run_passes
from spec_compiler.passes.infra import get_attr_path, set_attr_path, output_node, outputs, set_outputs

from .config import CompileConfig
from .errors import SpecCompileError
from .loading import DTYPES, load_draft, load_target
from .trace import trace

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def graph_inputs(cfg: CompileConfig, graph: str) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of a graph's inputs as traced (before passes change them)."""
    B, C, S = cfg.batch_size, cfg.prefill_chunk, cfg.max_seq_len
    dt = DTYPES[cfg.dtype]
    m = cfg.model
    H = m.hidden_size
    D1 = cfg.tree.max_depth + 1
    i64 = torch.long
    if graph in ("prefill", "verify"):
        T = C if graph == "prefill" else cfg.tree.n_nodes
        caches = [(f"{kv}_{i}", (B, m.n_kv_heads, S, m.head_dim), dt)
                  for i in range(m.n_layers) for kv in "kv"]
        return [("tokens", (B, T), i64), ("input_pos", (B, T), i64), ("cache_len", (B,), i64), *caches]
    d = cfg.draft.layer
    caches = [(f"{kv}_{i}", (B, d.n_kv_heads, S, d.head_dim), dt)
              for i in range(cfg.draft.n_layers) for kv in "kv"]
    T = C if graph == "draft_prefill" else max(D1, 2)
    return [("tokens", (B, T), i64), ("features", (B, T, H), dt), ("input_pos", (B, T), i64),
            ("cache_len", (B,), i64), *caches]


def example(shape, dtype, device) -> torch.Tensor:
    if dtype == torch.long:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device)


def trace_graph(cfg: CompileConfig, graph: str, module: torch.nn.Module) -> fx.GraphModule:
    """`module` exported for `graph`, before any pass: outputs logits, hidden, caches, plus
    `token_ids` for a draft with a reduced vocabulary (its `hot_ids` buffer, the target id of
    each logit column), which unroll_draft maps the top-k columns through. Such buffers are model
    data, not compile-time constants: gm.meta["weight_buffers"] names them for lift_weights."""
    specs = graph_inputs(cfg, graph)
    args = [example(s, d, cfg.device) for _, s, d in specs]
    names = [n for n, _, _ in specs]
    caches = [n for n in names if n[:2] in ("k_", "v_")]
    dyn = {"tokens": 1, "features": 1, "input_pos": 1} if graph == "draft" else None
    gm = trace(module, args, names, ["logits", "hidden", *caches], dynamic_dim=dyn)
    hot = getattr(module, "hot_ids", None) if graph.startswith("draft") else None
    if hot is not None:
        name = next((n for n, b in module.named_buffers() if b is hot), "hot_ids")
        try:
            get_attr_path(gm, name)  # export keeps every buffer, used or not
        except AttributeError:
            set_attr_path(gm, name, hot)
        with gm.graph.inserting_before(output_node(gm)):
            node = gm.graph.get_attr(name)
        set_outputs(gm, {**outputs(gm), "token_ids": node})
        gm.meta["weight_buffers"] = [name]
        gm.recompile()
    return gm


def build_graph(cfg: CompileConfig, graph: str, module: torch.nn.Module, debug_dir: Path | None):
    gm = trace_graph(cfg, graph, module)
    if graph == "draft_prefill":  # its logits are never used: don't compute them
        o = outputs(gm)
        del o["logits"]
        o.pop("token_ids", None)
        set_outputs(gm, o)
    gm = run_passes(gm, default_passes(graph, cfg.tree, cfg.prefill_chunk), debug_dir, graph)
    return gm


def final_input_specs(cfg: CompileConfig, graph: str, gm) -> list[tuple[str, tuple, torch.dtype]]:
    """Input specs of a rewritten graph, by placeholder name."""
    B, D1 = cfg.batch_size, cfg.tree.max_depth + 1
    dt = DTYPES[cfg.dtype]
    known = {n: (s, d) for n, s, d in graph_inputs(cfg, graph)}
    known.update({"acc_tokens": ((B, D1), torch.long), "acc_feats": ((B, D1, cfg.model.hidden_size), dt),
                  "n_acc": ((B,), torch.long)})
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out.append((n.target, *known[n.target]))
    return out


def compile_engine(cfg: CompileConfig, model_dir: Path, draft_dir: Path | None, out_dir: Path,
                   progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                   debug_dir: Path | None = None, draft_module: torch.nn.Module | None = None,
                   draft_vocab: str | int = "auto") -> Path:
    """Compile into `out_dir`, atomically: built in a temp dir beside it, renamed at the end.

    `draft_vocab` ("auto", "full" or N) picks the draft's vocabulary (`load_draft`).
    `draft_module` replaces loading `draft_dir` (tests use it for drafts with known behaviour;
    it must follow `EagleDraft.forward`'s calling convention, and may have `hot_ids`)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SpecCompileError(f"--out {out_dir} already exists; remove it or choose another path")
    t0 = time.time()
    progress(f"[1/4] loading {model_dir}" + (f" and draft {draft_dir}" if draft_dir else ""))
    target = load_target(model_dir, cfg.dtype).to(cfg.device)
    draft = draft_module
    if draft is None and draft_dir is not None:
        draft = load_draft(draft_dir, target, cfg.dtype, draft_vocab).to(cfg.device)
    return compile_modules(cfg, target, draft, out_dir, progress, debug_dir, model_dir=model_dir, t0=t0)


def compile_modules(cfg: CompileConfig, target: torch.nn.Module, draft: torch.nn.Module | None,
                    out_dir: Path, progress: Callable[[str], None] = lambda s: None,
                    debug_dir: Path | None = None, graphs: list[str] | None = None,
                    model_dir: Path | None = None, t0: float | None = None) -> Path:
    """Compile already-built modules (benchmarks use random-weight modules). `graphs` limits
    which step graphs are built (default: all that the tree needs). The manifest records the
    draft vocabulary of the module compiled (`hot_ids`), whatever cfg.draft said."""
    out_dir = Path(out_dir)
    if draft is not None and cfg.draft is not None:
        hot = getattr(draft, "hot_ids", None)
        cfg = dataclasses.replace(cfg, draft=dataclasses.replace(
            cfg.draft, draft_vocab_size=None if hot is None else hot.numel()))
    t0 = time.time() if t0 is None else t0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    prev = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        manifest = _build(cfg, target, draft, tmp, progress, debug_dir, graphs)
        for f in TOKENIZER_FILES if model_dir is not None else ():
            if (Path(model_dir) / f).is_file():
                (tmp / "tokenizer").mkdir(exist_ok=True)
                shutil.copy2(Path(model_dir) / f, tmp / "tokenizer" / f)
        write_manifest(tmp, manifest)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, prev)
    progress(f"done in {time.time() - t0:.0f}s: {out_dir}")
    return out_dir


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _build(cfg: CompileConfig, target, draft, tmp: Path, progress, debug_dir, graphs=None) -> Manifest:
    from safetensors.torch import save_file

    if graphs is None:
        graphs = ["prefill", "verify"] + (["draft_prefill", "draft"] if cfg.tree.n_nodes > 1 else [])
    registry = WeightRegistry()
    entries = {}
    for i, name in enumerate(graphs):
        owner = "draft" if name.startswith("draft") else "target"
        module = draft if owner == "draft" else target
        progress(f"[2/4] {name}: export + passes")
        gm = build_graph(cfg, name, module, debug_dir)
        specs = final_input_specs(cfg, name, gm)
        weights = lift_weights(gm, registry, prefix="draft." if owner == "draft" else "")
        gm = gm.to(cfg.device)
        args = [registry.tensors[w] for w in weights] + [example(s, d, cfg.device) for _, s, d in specs]
        fname = f"{name}.pt2"
        progress(f"[3/4] {name}: lowering with {cfg.backend} ({i + 1}/{len(graphs)})")
        lower(gm, args, tmp / fname, cfg.backend)
        entries[name] = {
            "file": fname, "owner": owner, "weights": weights,
            "inputs": [[n, list(s), str(d).removeprefix("torch.")] for n, s, d in specs],
            "outputs": list(gm.meta["output_names"]),
            "mutated": list(gm.meta.get("mutated_inputs", [])),
            "passes": list(gm.meta.get("passes", [])),
            "pass_counts": dict(gm.meta.get("pass_counts", {})),
        }
    progress(f"[4/4] writing weights ({sum(t.numel() for t in registry.tensors.values()) / 1e6:.1f}M params)")
    save_file({k: v.contiguous().cpu() for k, v in registry.tensors.items()}, str(tmp / "weights.safetensors"))
    return Manifest.new(cfg, entries)
