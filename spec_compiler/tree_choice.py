"""`spec-compile --tree auto`: per batch bucket, the static tree with the most expected tokens
per second at that batch on the device the engine is built for (the tree dispatcher: the
runtime runs each bucket's tree, engine_format "per-bucket trees").

    expected tokens/s (tree) = expected tokens per verify call (tree, the draft's acceptance table)
                               / predicted step time (tree, a cost model timed on the build device)

Acceptance table: `DRAFT_DIR/accept.json`, written by `spec-fit-tree` beside tree.json:
P(the target's next tokens have draft ranks beginning with path) for the most frequent rank
paths, so a tree's expected tokens per call is 1 + the sum over its nodes (train/fit_tree.py).

Cost model: one speculative step is a draft graph call and a verify graph call
(engine_format.py), so

    step(tree) = target(T)  +  sum over the draft's forwards f of draft(n_f)

T = the tree's nodes (the root included): the verify graph is one target forward over T new
tokens (acceptance and compaction are small beside it); the draft graph is the catch-up forward
over depth + 1 accepted pairs, then one forward per tree level over that level's nodes with
children (passes/unroll_draft.py). target(T) and draft(n) are the models' own eager forwards
timed on the build device at a typical context (256 tokens), at the bucket's batch b (a target
forward over b x T tokens, the draft's over b x n): on a CPU they are the same
matrix-multiply calls the compiled graphs make, and their cost is what depends on T (weights
read once up to a few rows, compute-bound beyond); the compiled graphs' savings elsewhere
(fusion, no Python) shift every candidate alike. Every size is timed in one round-robin, a
few rounds, the fastest round per size: other work on the machine only ever adds time, and
on a CPU it adds a lot (torch's threads wait at every parallel region for a thread another
process holds: a 40 ms forward measured 0.4-2 s beside one busy process), so the minimum is the
machine's cost and the median is the neighbours'. Expected tokens per call does not depend on
the batch; the step time does: at batch 1 a forward reads the weights once whatever T (bushy
trees are nearly free), at large batches on a GPU b x T tokens make it compute-bound, so the
measured step time grows with T, smaller trees win, and where no tree beats chain-0's tokens/s
the bucket decodes plainly (no draft graph). The timings decide; no constant does.

Candidates: chains (chain-0 is plain decoding: no draft call at all), the fitted trees of the
table's N most frequent paths for a range of N, and the draft's own tree.json. The manifest
records, per bucket, every candidate (nodes, depth, expected tokens/call, predicted step ms,
expected tokens/s), the timings and the choice (`tree_choice["buckets"]`). An explicit --tree
skips all of this and builds that tree at every bucket.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import SpecCompileError
from .fileio import atomic_write_text
from .hashing import sha256_file, weights_sha256
from .kernels.limits import MAX_TREE_NODES
from .trees import TreeSpec, chain, resolve_tree

ACCEPT = "accept.json"
ACCEPT_FORMAT = "spec-accept/1"
# Fitted-tree sizes tried (nodes with the root), and the longest chain tried.
FITTED_SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 26, 32, 40, 48, 64, 96)  # 40-96: GPU-sized trees
MAX_CHAIN = 6
ROUNDS = 7  # timing rounds (the fastest per size)
BUSY_SPREAD = 1.5  # a median round this much slower than the fastest: the timing was disturbed


def ranked(rates: dict[tuple[int, ...], float]) -> list[tuple[int, ...]]:
    """Rank paths, most frequent first (ties: shorter, then lower ranks)."""
    return sorted(rates, key=lambda p: (-rates[p], len(p), p))


def best_tree(rates: dict[tuple[int, ...], float], n_nodes: int, name: str = "fitted") -> TreeSpec:
    """The n_nodes - 1 most frequent rank paths: prefix-closed, since a path is at least as
    frequent as any of its extensions (and ties go to the shorter)."""
    return TreeSpec(name, tuple(ranked(rates)[:n_nodes - 1]))


def expected_tpc(tree: TreeSpec, rates: dict[tuple[int, ...], float]) -> float:
    """Tokens per verify call: 1 (the bonus) + P(each node is accepted)."""
    return 1 + sum(rates.get(p, 0.0) for p in tree.paths)


@dataclass(frozen=True)
class AcceptTable:
    """P(ranks begin with path) per rank path (the most frequent ones), from spec-fit-tree."""

    rates: dict[tuple[int, ...], float]
    n_starts: int
    header: dict  # how it was made: command, settings, prompts, the draft's weights' sha256

    def expected_tpc(self, tree: TreeSpec) -> float:
        return expected_tpc(tree, self.rates)

    def fitted(self, n_nodes: int) -> TreeSpec:
        """best_tree of n_nodes (fewer if the table has fewer paths), named `fitted-N`."""
        return best_tree(self.rates, n_nodes, f"fitted-{min(n_nodes, len(self.rates) + 1)}")

    def to_json(self) -> dict:
        return {"format": ACCEPT_FORMAT, **self.header, "n_starts": self.n_starts,
                "paths": [[list(p), round(self.rates[p], 6)] for p in ranked(self.rates)]}

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=None) + "\n")

    @classmethod
    def read(cls, path: Path) -> "AcceptTable":
        what = f"{path} (the draft's acceptance table, written by spec-fit-tree)"
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpecCompileError(f"{what}: unreadable ({e}); rerun spec-fit-tree or delete it") from None
        try:
            if d["format"] != ACCEPT_FORMAT:
                raise ValueError(f"format {d['format']!r}, expected {ACCEPT_FORMAT!r}")
            rates = {tuple(int(r) for r in p): float(v) for p, v in d["paths"]}
            if any(not p or min(p) < 0 for p in rates) or any(not 0 <= v <= 1 for v in rates.values()):
                raise ValueError("paths must be non-empty rank lists with rates in [0, 1]")
            header = {k: v for k, v in d.items() if k not in ("format", "n_starts", "paths")}
            return cls(rates, int(d["n_starts"]), header)
        except (KeyError, TypeError, ValueError) as e:
            raise SpecCompileError(f"{what}: corrupt ({e}); rerun spec-fit-tree or delete it") from None


def read_accept(draft_dir: Path | None) -> AcceptTable | None:
    """The draft's acceptance table, or None when it ships none."""
    if draft_dir is None or not (Path(draft_dir) / ACCEPT).is_file():
        return None
    return AcceptTable.read(Path(draft_dir) / ACCEPT)


def made_for(table: AcceptTable, draft_dir: Path) -> bool:
    """Whether `table` was fitted with the draft weights in `draft_dir` (a table that records no
    weights hash is taken as made for them)."""
    want = table.header.get("draft_sha256")
    return want is None or want == draft_weights_sha256(Path(draft_dir))


def draft_weights_sha256(draft_dir: Path) -> str | None:
    """The draft's weights' identity (what accept.json records): model.safetensors's sha256, or
    for a sharded draft one sha256 over its safetensors files (hashing.weights_sha256)."""
    p = Path(draft_dir) / "model.safetensors"
    if p.is_file():
        return sha256_file(p)
    if (Path(draft_dir) / "model.safetensors.index.json").is_file():
        return weights_sha256(Path(draft_dir))
    return None


def draft_forwards(tree: TreeSpec) -> list[int]:
    """Block lengths of the draft graph's forwards: the catch-up over depth + 1 accepted pairs,
    then each level's nodes with children (unroll_draft); [] for a root-only tree."""
    if tree.n_nodes == 1:
        return []
    has_child = set(tree.parent[1:])
    out = [tree.max_depth + 1]
    for d in range(1, tree.max_depth + 1):
        n = sum(1 for i in tree.level_nodes(d) if i in has_child)
        if not n:
            break
        out.append(n)
    return out


def candidates(table: AcceptTable, extra: list[TreeSpec] = (), max_depth: int | None = None) -> list[TreeSpec]:
    """`extra` (the draft's tree.json), chains, fitted trees of FITTED_SIZES nodes: each
    distinct path set once (under the first of its names), within MAX_TREE_NODES and max_depth."""
    deepest = max((len(p) for p in table.rates), default=0)
    trees = list(extra) + [chain(k) for k in range(min(MAX_CHAIN, deepest) + 1)]
    trees += [table.fitted(n) for n in FITTED_SIZES if n - 1 <= len(table.rates)]
    seen, out = set(), []
    for t in trees:
        key = frozenset(t.paths)
        if key in seen or t.n_nodes > MAX_TREE_NODES or (max_depth is not None and t.max_depth > max_depth):
            continue
        seen.add(key)
        out.append(t)
    return out


@dataclass(frozen=True)
class CostModel:
    """Milliseconds of the target's forward over T new tokens and of one draft forward over n."""

    target_ms: dict[int, float]
    draft_ms: dict[int, float]
    spread: float = 1.0  # the worst median/fastest ratio over the sizes: how busy the machine was
    timing: str = "eager"  # how the forwards ran: "eager", or "cuda_graph" (replays, on a GPU)

    def step_ms(self, tree: TreeSpec) -> float:
        return (_interp(self.target_ms, tree.n_nodes)
                + sum(_interp(self.draft_ms, n) for n in draft_forwards(tree)))

    def to_json(self) -> dict:
        return {"target_ms": {str(k): round(v, 3) for k, v in sorted(self.target_ms.items())},
                "draft_ms": {str(k): round(v, 3) for k, v in sorted(self.draft_ms.items())},
                "spread": round(self.spread, 2), "timing": self.timing}


def _interp(table: dict[int, float], x: int) -> float:
    """Piecewise linear in the measured sizes (constant extrapolation below, linear above)."""
    if x in table:
        return table[x]
    xs = sorted(table)
    lo = max([k for k in xs if k < x], default=xs[0])
    hi = min([k for k in xs if k > x], default=None)
    if hi is None:  # past the largest size: extend the last segment
        lo, hi = (xs[-2], xs[-1]) if len(xs) > 1 else (xs[-1], xs[-1])
    if hi == lo:
        return table[lo]
    return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


def choose(cands: list[TreeSpec], table: AcceptTable, cost: CostModel) -> tuple[TreeSpec, list[dict]]:
    """The candidate with the most expected tokens per second (ties: fewer nodes), and the
    record of every candidate, best first."""
    rows = []
    for t in cands:
        tpc, ms = table.expected_tpc(t), cost.step_ms(t)
        rows.append({"name": t.name, "nodes": t.n_nodes, "depth": t.max_depth,
                     "expected_tokens_per_call": round(tpc, 4), "predicted_step_ms": round(ms, 3),
                     "expected_tokens_per_s": round(1000 * tpc / ms, 2), "paths": [list(p) for p in t.paths]})
    order = sorted(range(len(cands)), key=lambda i: (-rows[i]["expected_tokens_per_s"], cands[i].n_nodes))
    return cands[order[0]], [rows[i] for i in order]


@torch.inference_mode()
def measure(target: torch.nn.Module, draft: torch.nn.Module | None, target_sizes: list[int],
            draft_sizes: list[int], capacity: int, context: int, rounds: int = ROUNDS,
            batch: int = 1) -> CostModel:
    """Time target(T) and draft(n) forwards (on the modules' device and dtype) of `batch`
    sequences over caches of `capacity` slots holding `context` tokens: `rounds` round-robin
    passes over every size after one warm-up pass, the fastest round per size. On a GPU each
    forward is captured as a CUDA graph and its replays are timed: eager forwards there are
    bound by kernel launches (a small model's take the same time at 1 and 96 tokens), which
    would hide what a bigger tree costs the engine, whose step is one replay. Eager where a
    capture fails."""
    jobs: dict[tuple[str, int], Callable[[], object]] = {}
    for name, module, sizes in (("target", target, target_sizes), ("draft", draft, draft_sizes)):
        if module is None:
            continue
        p = next(module.parameters())
        layers = len(module.layers) if hasattr(module, "layers") else 1  # EAGLE-3: its one midlayer
        kv = [torch.zeros(module.cache_shape(batch, capacity), dtype=p.dtype, device=p.device)
              for _ in range(2 * layers)]
        for n in sizes:
            jobs[(name, n)] = _forward(module, n, context, kv, batch)
    dev = next(target.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timing = "eager"
    if dev.type == "cuda":
        graphed, failure = _graphed(jobs)
        jobs, timing = (graphed, "cuda_graph") if graphed is not None else (jobs, f"eager: {failure}")
    times: dict[tuple[str, int], list[float]] = {k: [] for k in jobs}
    for r in range(rounds + 1):
        for k, fn in jobs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r:
                times[k].append(1000 * (time.perf_counter() - t))
    best = {k: min(v) for k, v in times.items()}
    spread = max((sorted(v)[len(v) // 2] / best[k] for k, v in times.items()), default=1.0)
    return CostModel(monotone({T: best[("target", T)] for T in target_sizes}),
                     monotone({n: best[("draft", n)] for n in draft_sizes if draft is not None}),
                     spread, timing)


def _graphed(jobs: dict) -> tuple[dict | None, str]:
    """Each job captured as a CUDA graph (one memory pool shared by all: they run one at a
    time and their outputs are not kept), as job -> its replay; (None, why) if a forward
    cannot be captured."""
    from .runtime.cuda_graph import CapturedStep

    pool = torch.cuda.graph_pool_handle()
    try:
        return {k: CapturedStep(fn, warmup=1, pool=pool) for k, fn in jobs.items()}, ""
    except RuntimeError as e:
        torch.cuda.synchronize()
        return None, (str(e).splitlines() or [type(e).__name__])[0][:160]


def monotone(ms: dict[int, float]) -> dict[int, float]:
    """A forward over fewer tokens costs no more than one over more (the same weights, less
    work): each size's time is capped by every larger size's, which removes what interference
    added to one size and not another and leaves a clean measurement as it is."""
    out, cap = {}, float("inf")
    for n in sorted(ms, reverse=True):
        cap = min(cap, ms[n])
        out[n] = cap
    return dict(sorted(out.items()))


def _forward(module: torch.nn.Module, n: int, context: int, kv: list[torch.Tensor],
             batch: int = 1) -> Callable[[], object]:
    """One forward of `module` (Llama or EagleDraft calling convention) of `batch` sequences
    over n new tokens at slots context + [0, n) of the caches `kv`."""
    p = next(module.parameters())
    dev, dt = p.device, p.dtype
    tokens = torch.zeros(batch, n, dtype=torch.long, device=dev)
    pos = (context + torch.arange(n, device=dev)[None]).expand(batch, n)
    cache_len = torch.full((batch,), context, dtype=torch.long, device=dev)
    if hasattr(module, "fc"):  # a draft: (token, feature) pairs, hidden-wide features as every
        # forward of the unrolled draft step takes them (an EAGLE-3 head's fc fuses the target's
        # layers once, before them)
        feats = torch.zeros(batch, n, module.embed_tokens.weight.shape[1], dtype=dt, device=dev)
        return lambda: module(tokens, feats, pos, cache_len, *kv)
    return lambda: module(tokens, pos, cache_len, *kv)


@dataclass(frozen=True)
class AutoTree:
    """--tree auto with an acceptance table: pick the tree once the modules are loaded."""

    table: AcceptTable
    extra: tuple[TreeSpec, ...] = ()  # the draft's tree.json
    source: str = ""  # where the table came from (for the record)

    def choose_buckets(self, target, draft, capacity: int, min_capacity: Callable[[int], int],
                       buckets: tuple[int, ...], log: Callable[[str], None] = lambda s: None
                       ) -> tuple[tuple[TreeSpec, ...], dict]:
        """`choose` at every batch bucket: (the tree of each bucket, the manifest record: the
        table it used and each bucket's record under "buckets")."""
        trees, per = [], {}
        for b in buckets:
            tree, rec = self.choose(target, draft, capacity, min_capacity, log, batch=b)
            trees.append(tree)
            per[str(b)] = rec
        return tuple(trees), {"method": "auto", "accept_table": self.source,
                              "accept_n_starts": self.table.n_starts,
                              "choice": {b: r["choice"] for b, r in per.items()}, "buckets": per}

    def choose(self, target, draft, capacity: int, min_capacity: Callable[[int], int],
               log: Callable[[str], None] = lambda s: None, batch: int = 1) -> tuple[TreeSpec, dict]:
        """Measure the cost model at `batch` for every candidate's sizes and pick; returns the
        tree and the record. `min_capacity(depth)` drops trees whose step does not fit."""
        cands = [t for t in candidates(self.table, list(self.extra)) if min_capacity(t.max_depth) <= capacity]
        if draft is None:
            cands = [t for t in cands if t.n_nodes == 1]
        t0 = time.perf_counter()
        sizes = sorted({t.n_nodes for t in cands})
        # A typical context, in a cache just large enough: the engine's attention reads the
        # filled slots only (ops/tree_attention.py), so the capacity itself costs nothing there.
        context = max(0, min(256, capacity // 4, capacity - sizes[-1]))
        span = context + sizes[-1]
        cost = measure(target, draft, sizes, sorted({n for t in cands for n in draft_forwards(t)}),
                       span, context, batch=batch)
        tree, rows = choose(cands, self.table, cost)
        best = rows[0]
        log(f"[tree] auto, batch {batch}: {tree.name} ({tree.n_nodes} nodes): {best['expected_tokens_per_call']:.2f} "
            f"tokens/call expected, {best['predicted_step_ms']:.1f} ms/step predicted, "
            f"{best['expected_tokens_per_s']:.1f} tokens/s; {len(rows)} candidates timed in "
            f"{time.perf_counter() - t0:.1f}s")
        if cost.timing.startswith("eager:") and next(target.parameters()).is_cuda:
            log(f"[tree] note: the forwards could not be captured as CUDA graphs, so they were timed "
                f"eagerly (launch-bound: bigger trees may look cheaper than they are): {cost.timing[7:]}")
        if cost.spread > BUSY_SPREAD:
            log(f"[tree] note: the machine was busy while timing (a forward's median round took "
                f"{cost.spread:.1f}x its fastest); the choice may not be the fastest tree: rebuild "
                f"on an idle machine, or name a tree with --tree")
        return tree, {"method": "auto", "choice": tree.name, "batch": batch, "accept_table": self.source,
                      "accept_n_starts": self.table.n_starts, "cost_model": {
                          **cost.to_json(), "context": context, "cache_slots": span,
                          "rounds": ROUNDS, "seconds": round(time.perf_counter() - t0, 2)},
                      "candidates": rows}


def fitted_tree(name: str, draft_dir: Path | None) -> TreeSpec | None:
    """--tree fitted-N: the best N-node tree (the root included) of the draft's own acceptance
    table, DRAFT_DIR/accept.json (spec-fit-tree), made from these weights; None for any other
    --tree. A missing draft, a missing, corrupt or stale table, or N outside 1..MAX_TREE_NODES:
    SpecCompileError naming the fix."""
    import re

    m = re.fullmatch(r"fitted-([0-9]+)", name)
    if m is None:
        return None
    n = int(m.group(1)) if len(m.group(1)) <= 6 else 10**6
    if not 1 <= n <= MAX_TREE_NODES:
        raise SpecCompileError(f"--tree {name}: N must be 1..{MAX_TREE_NODES} (nodes with the root)")
    if draft_dir is None:
        raise SpecCompileError(f"--tree {name}: needs --draft DRAFT_DIR (the tree comes from its "
                               f"acceptance table, {ACCEPT})")
    if not Path(draft_dir).is_dir():
        raise SpecCompileError(f"--draft {draft_dir}: no such directory")
    path, table = Path(draft_dir) / ACCEPT, read_accept(draft_dir)
    if table is None:
        raise SpecCompileError(f"--tree {name}: {path} does not exist; make it with spec-fit-tree "
                               f"MODEL_DIR {draft_dir}, or use --tree auto, chain-K or a JSON file")
    if not made_for(table, draft_dir):
        raise SpecCompileError(f"--tree {name}: {path} was made for other draft weights; rerun "
                               f"spec-fit-tree MODEL_DIR {draft_dir}")
    return table.fitted(n)


def auto_tree(draft_dir: Path | None, log: Callable[[str], None] = lambda s: None
              ) -> tuple[TreeSpec, AutoTree | None]:
    """--tree auto before anything is loaded: the tree to build if no choice is made (the
    draft's tree.json if it ships one, else mc_sim_7b_63) and, when the draft ships an
    acceptance table made from these weights, the chooser that replaces it."""
    fitted = draft_dir is not None and (Path(draft_dir) / "tree.json").is_file()
    fallback = resolve_tree(str(Path(draft_dir) / "tree.json") if fitted else "mc_sim_7b_63")
    table = read_accept(draft_dir)
    if table is None:
        return fallback, None
    if not made_for(table, draft_dir):
        log(f"note: {Path(draft_dir) / ACCEPT} was made for other draft weights; ignoring it "
            f"(rerun spec-fit-tree); building tree {fallback.name}")
        return fallback, None
    return fallback, AutoTree(table, (fallback,) if fitted else (), str(Path(draft_dir) / ACCEPT))
