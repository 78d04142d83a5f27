"""The engine contract: what an engine directory is and what its step graphs take and return.

One definition, read by everyone: the compiler (`pipeline.py`) builds and checks its graphs
against it and writes it into `manifest.json`; the runtime (`runtime/loader.py`,
`runtime/generate.py`) allocates its state and binds graph inputs from it; benchmarks use the
runtime's public API, never names from here. Any change to what is below bumps SCHEMA_VERSION,
and an engine of another version fails to load with one clear line.

Sizes (`Dims`): B batch slots (the largest batch bucket, `--max-batch`), C prefill chunk, S
capacity (max_seq_len), T tree nodes (root included; per bucket), D tree depth (the deepest
bucket's: every bucket's step state is D + 1 wide), F draft feature width (the
target features a draft step reads: the final hidden state for EAGLE-1/2, several layers' for
EAGLE-3), H hidden, V vocabulary, Vd the draft's vocabulary.

Per-slot state: every tensor has the batch (slot) dimension first, B = the largest bucket. The
runtime owns it; the graphs read it and return the new step state, which the runtime copies
back (on the device, in the captured step), masked to the live slots.

Batch buckets (`buckets(B)`: 1, 2, 4, ... up to B, B included). The step graphs (draft, verify,
verify_sampled) are compiled once per bucket b and run over slots [0, b): their inputs are the
first b rows of the state, views that share its storage (slot-major, so a prefix of slots is
contiguous; no copy, and a CUDA graph captured on them replays on the same buffers). The
runtime runs the smallest bucket that holds its highest live slot (runtime/generate.py says
why slots are never moved). Every slot in the bucket computes; the runtime masks the state of
slots that are not live (free, finished, or still being prefilled): their outputs are dropped,
and their writes land in their own cache rows past their valid data, never in another slot's
and never over data they will read, because a slot that is not live is *parked*: n_acc = 1 and
cache_len = (its valid cache length) + 1, so verify writes slots cache_len + [0, D] and the
draft's catch-up writes cache_len - n_acc + [0, D], both at or past the valid length, and the
next prefill chunk or the next live step writes them again before anything reads them.

Prefill is per slot: prefill and draft_prefill are compiled at batch 1 and called with one
slot's rows of the caches and cache_len (`state[k][i:i+1]`, views again). So admitting a
sequence prefills only its slot, chunk by chunk, between the steps of the others, which are
not touched (a batched prefill would compute and write for every slot of the bucket, and a
slot mid-generation cannot take C more cache rows near its capacity).

Engine graphs (inputs in order; `args` are passed per call, the rest are state; B is the
graph's batch, `graph_batch`: 1 for the prefill graphs, the bucket for the step graphs):
    prefill        tokens (B,C) | cache_len, target caches          -> logits (B,C,V) f32, hidden (B,C,F)
    draft_prefill  tokens (B,C), features (B,C,F) | cache_len, draft caches     -> hidden (B,C,H)
    draft          acc_tokens, acc_feats, n_acc, cache_len, draft caches        -> tree_tokens (B,T)
    verify         tokens (B,T) | cache_len, target caches
                   -> acc_tokens (B,D+1), acc_feats (B,D+1,F), n_acc (B,), cache_len (B,)   (greedy)
    verify_sampled the same, + temperature, top_p, top_k, seed (state): greedy rows where the
                   temperature is 0, speculative sampling elsewhere. A separate graph, so greedy
                   steps pay nothing for sampling (its sort over the vocabulary costs a CPU step
                   as much as the target's forward); absent from engines built with --no-sampling.
Caches are mutated in place. A root-only tree (chain-0) has no draft graphs.

Per-bucket trees (`Dims.bucket_nodes`, the manifest's `bucket_trees`): each bucket has its own
tree (`spec-compile --tree auto` picks one per bucket; an explicit --tree gives every bucket the
same). The step state stays one shape for all buckets, so a sequence keeps its slot whatever
bucket the next step runs: acc_tokens/acc_feats are D + 1 wide for the deepest bucket's D;
verify at a shallower bucket pads its accepted path to that width (entries past n_acc are
padding, as always), and every draft graph's catch-up reads all D + 1 pairs, so a step after a
deeper bucket's catches up everything that bucket accepted. A bucket whose tree is chain-0
runs no draft graph at all (plain decoding: verify over the root). The draft's cache then falls
behind for the slots decoding there; an engine that mixes plain and speculative buckets
(`Dims.mixed`) keeps the pairs those steps accepted (`hist_tokens`, `hist_feats`, per cache
position) and, before a speculative step, the runtime catches a slot that ran plain steps up
over the gap with draft_prefill, chunk by chunk (`draft_len`: the draft cache's valid length
before the pending pairs). Its draft caches have C spare rows so a padded catch-up chunk that
starts anywhere below capacity fits. An engine built with measured dispatch (`--tree auto`,
pipeline.measure_dispatch) is mixed from the start, whichever buckets end up plain: its
graphs are lowered before the timing decides, so all of them see the mixed state.
Every computation in a graph is per slot (no reduction across slots; the CPU attention reads
the prefix up to the longest slot's cache_len, masked per slot), so what a slot's rows compute
does not depend on what the other slots hold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import SpecCompileError

SCHEMA_VERSION = 4  # 3: batch buckets, per-slot prefill graphs; 4: a tree per bucket
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
GRAPHS = ("prefill", "draft_prefill", "draft", "verify", "verify_sampled")
DRAFT_GRAPHS = ("draft_prefill", "draft")
PREFILL_GRAPHS = ("prefill", "draft_prefill")  # per slot: batch 1 whatever the buckets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "bool": torch.bool}


def weights_file(rank: int, tp: int) -> str:
    """The weights a rank loads: WEIGHTS at TP 1, `weights.rank{r}.safetensors` per rank above."""
    return WEIGHTS if tp == 1 else f"weights.rank{rank}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a DTYPES key; "model" is resolved to the engine's dtype by Dims

    def to_json(self) -> list:
        return [self.name, list(self.shape), self.dtype]

    def empty(self, device) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=DTYPES[self.dtype], device=device)


@dataclass(frozen=True)
class Dims:
    """Every size the engine's graphs and state are built from."""

    batch: int
    max_seq_len: int
    prefill_chunk: int
    tree_nodes: int
    tree_depth: int
    vocab: int
    hidden: int
    feature_dim: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    draft_layers: int  # 0: no draft graphs
    draft_kv_heads: int
    draft_head_dim: int
    dtype: str  # the engine's floating dtype, a DTYPES key
    sampling: bool  # the engine has verify_sampled (temperature > 0)
    # Tree nodes per bucket, in buckets(batch) order (tree_nodes is the last: this batch's).
    bucket_nodes: tuple[int, ...] = ()
    # Some buckets speculate and some decode plainly: the draft's cache must catch up over the
    # plain steps (the module docstring), so the state keeps their accepted pairs. A field, not
    # derived, so every graph's dims (`graph_dims`: its bucket prefix) agree on the state.
    mixed: bool = False

    def __post_init__(self):
        n = len(buckets(self.batch)) if self.batch >= 1 else 0
        if len(set(self.bucket_nodes)) <= 1 and len(self.bucket_nodes) != n:  # one tree for all
            object.__setattr__(self, "bucket_nodes", (self.tree_nodes,) * n)
        if len(self.bucket_nodes) != n or (n and self.bucket_nodes[-1] != self.tree_nodes):
            raise ValueError(f"bucket_nodes {self.bucket_nodes} do not fit batch {self.batch} "
                             f"and tree_nodes {self.tree_nodes}")

    @classmethod
    def from_config(cls, cfg) -> "Dims":
        """From a `config.CompileConfig`."""
        m, d = cfg.model, cfg.draft
        trees = cfg.trees()
        has_draft = d is not None and any(t.n_nodes > 1 for t in trees)
        return cls(batch=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                   prefill_chunk=cfg.prefill_chunk, tree_nodes=trees[-1].n_nodes,
                   tree_depth=max(t.max_depth for t in trees), vocab=m.vocab_size, hidden=m.hidden_size,
                   feature_dim=m.hidden_size * max(1, len(d.fused_layers) if has_draft else 0),
                   n_layers=m.n_layers, n_kv_heads=m.n_kv_heads,
                   head_dim=m.head_dim, draft_layers=d.n_layers if has_draft else 0,
                   draft_kv_heads=d.layer.n_kv_heads if has_draft else 0,
                   draft_head_dim=d.layer.head_dim if has_draft else 0, dtype=cfg.dtype,
                   sampling=cfg.sampling, bucket_nodes=tuple(t.n_nodes for t in trees),
                   mixed=has_draft and (min(t.n_nodes for t in trees) == 1
                                        or cfg.plain_alternates))

    @classmethod
    def from_json(cls, d: dict) -> "Dims":
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise SpecCompileError(f"manifest dims {sorted(set(d) ^ names)} differ from this "
                                   "runtime's; rebuild the engine with this spec-compile")
        try:
            nodes = tuple(int(n) for n in d["bucket_nodes"])
            ok = len(nodes) == len(buckets(int(d["batch"])))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise SpecCompileError("manifest dims bucket_nodes do not match its buckets; rebuild the "
                                   "engine with this spec-compile")
        try:
            return cls(**{**d, "bucket_nodes": nodes})
        except (TypeError, ValueError) as e:
            raise SpecCompileError(f"manifest dims are inconsistent ({e}); rebuild the engine with "
                                   "this spec-compile") from None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "bucket_nodes": list(self.bucket_nodes)}

    @property
    def step_slots(self) -> int:
        return step_slots(self.tree_depth)

    @property
    def has_draft(self) -> bool:
        """The engine has draft graphs and caches (some bucket speculates)."""
        return self.draft_layers > 0

    def speculates(self, bucket: int) -> bool:
        """Bucket `bucket` runs a draft graph (its tree is more than the root)."""
        return self.has_draft and self.bucket_nodes[buckets(self.batch).index(bucket)] > 1


    def fits(self, n_prompt: int, max_new_tokens: int) -> bool:
        """A request fits when its padded prompt and every step it may take stay in capacity:
        generation stops once the next step would not fit (stop_reason "length")."""
        padded = -(-n_prompt // self.prefill_chunk) * self.prefill_chunk
        return padded <= self.max_seq_len and n_prompt + max_new_tokens + self.step_slots <= self.max_seq_len


def buckets(max_batch: int) -> tuple[int, ...]:
    """The batch buckets of an engine with `max_batch` slots: the powers of two below it, then
    max_batch itself (1, 2, 4, ..., max_batch)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def graph_batch(dims: Dims, graph: str, bucket: int | None = None) -> int:
    """The batch a compiled graph runs at: 1 for the per-slot prefill graphs, else the bucket
    (default: the largest, dims.batch)."""
    return 1 if graph in PREFILL_GRAPHS else dims.batch if bucket is None else bucket


def graph_dims(dims: Dims, graph: str, bucket: int | None = None) -> Dims:
    """`dims` as seen by one compiled graph: its batch is `graph_batch`, its tree that bucket's
    (the state's widths, tree_depth included, stay the engine's)."""
    b = graph_batch(dims, graph, bucket)
    nodes = dims.bucket_nodes[:len(buckets(b))]  # buckets(b) is a prefix of buckets(batch)
    return dataclasses.replace(dims, batch=b, bucket_nodes=nodes, tree_nodes=nodes[-1])


def nodes_at(dims: Dims, bucket: int, n_nodes: int) -> Dims:
    """`dims` with bucket `bucket`'s tree of `n_nodes` nodes (the state, tree_depth included,
    unchanged): how an alternative to a speculating bucket's graphs sees the engine
    (`pipeline.measure_dispatch`)."""
    nodes = tuple(n_nodes if b == bucket else n for b, n in zip(buckets(dims.batch), dims.bucket_nodes))
    return dataclasses.replace(dims, bucket_nodes=nodes, tree_nodes=nodes[-1])


def plain_at(dims: Dims, bucket: int) -> Dims:
    """`dims` with bucket `bucket` decoding plainly (its tree the root alone)."""
    return nodes_at(dims, bucket, 1)


def graph_file(graph: str, batch: int, ext: str = "pt2") -> str:
    """An artifact's file name: NAME.pt2 at batch 1, NAME.bN.pt2 for a larger bucket (.onnx for
    the onnx backend)."""
    return f"{graph}.{ext}" if batch == 1 else f"{graph}.b{batch}.{ext}"


def step_slots(tree_depth: int) -> int:
    """Cache slots past cache_len one speculative step writes: the accepted path (D + 1) in the
    target cache (verify compacts it there; the tree's own K/V never touch the cache) and the
    catch-up pairs in the draft's."""
    return tree_depth + 1


def min_capacity(prefill_chunk: int, tree_depth: int) -> int:
    """The smallest max_seq_len that holds one prefill chunk and one step after it."""
    return prefill_chunk + step_slots(tree_depth)


def caches(dims: Dims, owner: str) -> list[TensorSpec]:
    """The KV cache inputs of a graph owned by `owner` ("target" or "draft"), as graphs name them."""
    n, h, dh = ((dims.n_layers, dims.n_kv_heads, dims.head_dim) if owner == "target"
                else (dims.draft_layers, dims.draft_kv_heads, dims.draft_head_dim))
    return [TensorSpec(f"{kv}_{i}", (dims.batch, h, cache_rows(dims, owner), dh), dims.dtype)
            for i in range(n) for kv in "kv"]


def cache_rows(dims: Dims, owner: str) -> int:
    """Rows of an owner's KV cache: max_seq_len, plus a prefill chunk of spare rows in the
    draft's of a mixed engine (a catch-up chunk starting below capacity fits, padding included)."""
    return dims.max_seq_len + (dims.prefill_chunk if owner == "draft" and dims.mixed else 0)


def owner(graph: str) -> str:
    return "draft" if graph in DRAFT_GRAPHS else "target"


def state_key(graph: str, name: str) -> str:
    """The runtime state entry a graph input reads: caches per owner, everything else shared."""
    return f"{owner(graph)}.{name}" if name[:2] in ("k_", "v_") else name


def step_state(dims: Dims) -> list[TensorSpec]:
    """What one speculative step reads and writes besides the caches (the verify outputs)."""
    B, D1 = dims.batch, dims.tree_depth + 1
    return [TensorSpec("acc_tokens", (B, D1), "int64"),      # emitted tokens of the last step
            TensorSpec("acc_feats", (B, D1, dims.feature_dim), dims.dtype),  # their features
            TensorSpec("n_acc", (B,), "int64"),              # how many of them are real
            TensorSpec("cache_len", (B,), "int64")]          # valid cache slots


def slot_state(dims: Dims) -> list[TensorSpec]:
    """Per-slot bookkeeping the runtime keeps on the device (the captured step updates it)."""
    B, S, D1 = dims.batch, dims.max_seq_len, dims.tree_depth + 1
    return [TensorSpec("slot_valid", (B,), "bool"),    # the slot holds a live sequence
            TensorSpec("done", (B,), "bool"),          # finished: its writes are masked
            TensorSpec("n_out", (B,), "int64"),        # tokens emitted so far
            TensorSpec("n_steps", (B,), "int64"),      # verify calls so far
            TensorSpec("max_new", (B,), "int64"),      # its max_new_tokens
            TensorSpec("out_buf", (B, S + D1 + 1), "int64"),  # emitted tokens; last column: masked writes
            TensorSpec("accept_hist", (B, S + 1), "int64"),   # tokens emitted per verify call
            *sampling_state(dims), *catchup_state(dims)]


def catchup_state(dims: Dims) -> list[TensorSpec]:
    """A mixed engine's record for the draft's catch-up over plain steps (the module docstring):
    the draft cache's valid length, and the (token, feature) pair of every cache position that
    a plain step accepted (D + 1 columns past capacity take a step's padded writes)."""
    if not dims.mixed:
        return []
    B, W = dims.batch, dims.max_seq_len + dims.tree_depth + 1
    return [TensorSpec("draft_len", (B,), "int64"), TensorSpec("hist_tokens", (B, W), "int64"),
            TensorSpec("hist_feats", (B, W, dims.feature_dim), dims.dtype)]


def sampling_state(dims: Dims) -> list[TensorSpec]:
    """Per-slot sampling parameters, read by verify. temperature 0 is greedy; top_k 0 and
    top_p 1 are no restriction. Draws are keyed by (seed, token position, tree node, purpose):
    the position is the counter, so no RNG state advances (spec_compiler/sampling.py)."""
    B = dims.batch
    return [TensorSpec("temperature", (B,), "float32"), TensorSpec("top_p", (B,), "float32"),
            TensorSpec("top_k", (B,), "int64"), TensorSpec("seed", (B,), "int64")]


def state(dims: Dims) -> list[TensorSpec]:
    """Every runtime state tensor: step state, slot state, caches (keys as in `state_key`)."""
    kv = [dataclasses.replace(c, name=f"target.{c.name}") for c in caches(dims, "target")]
    if dims.has_draft:
        kv += [dataclasses.replace(c, name=f"draft.{c.name}") for c in caches(dims, "draft")]
    return [*step_state(dims), *slot_state(dims), *kv]


def state_bytes(dims: Dims) -> int:
    """Bytes of every runtime state tensor (what the runtime allocates for an engine), without
    listing each layer's caches (a hostile config may claim 2^31 layers)."""
    def nbytes(specs: list[TensorSpec]) -> int:
        return sum(DTYPES[t.dtype].itemsize * math.prod(t.shape) for t in specs)

    one = dataclasses.replace(dims, n_layers=1, draft_layers=1)
    return (nbytes([*step_state(dims), *slot_state(dims)])
            + dims.n_layers * nbytes(caches(one, "target"))
            + dims.draft_layers * nbytes(caches(one, "draft")))


@dataclass(frozen=True)
class GraphIO:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    args: tuple[str, ...]  # inputs passed per call; the others are read from state
    mutates: tuple[str, ...]  # inputs written in place


def graph_io(dims: Dims, graph: str) -> GraphIO:
    """A compiled engine graph's interface."""
    B, C, T, D1 = dims.batch, dims.prefill_chunk, dims.tree_nodes, dims.tree_depth + 1
    i64, dt = "int64", dims.dtype
    cache_len = TensorSpec("cache_len", (B,), i64)
    kv = caches(dims, owner(graph))
    mut = tuple(c.name for c in kv)
    if graph == "prefill":
        return GraphIO([TensorSpec("tokens", (B, C), i64), cache_len, *kv],
                       [TensorSpec("logits", (B, C, dims.vocab), "float32"),
                        TensorSpec("hidden", (B, C, dims.feature_dim), dt)], ("tokens",), mut)
    if graph == "draft_prefill":
        return GraphIO([TensorSpec("tokens", (B, C), i64),
                        TensorSpec("features", (B, C, dims.feature_dim), dt), cache_len, *kv],
                       [TensorSpec("hidden", (B, C, dims.hidden), dt)], ("tokens", "features"), mut)
    if graph == "draft":
        return GraphIO([*step_state(dims)[:3], cache_len, *kv],
                       [TensorSpec("tree_tokens", (B, T), i64)], (), mut)
    if graph in ("verify", "verify_sampled"):
        knobs = sampling_state(dims) if graph == "verify_sampled" else []
        return GraphIO([TensorSpec("tokens", (B, T), i64), cache_len, *kv, *knobs],
                       step_state(dims), ("tokens",), mut)
    raise ValueError(f"unknown graph {graph!r}")


def graphs(dims: Dims) -> tuple[str, ...]:
    """The graphs an engine of these dims has (at some batch)."""
    return tuple(g for g in GRAPHS if (dims.has_draft or g not in DRAFT_GRAPHS)
                 and (dims.sampling or g != "verify_sampled"))


def graph_batches(dims: Dims, graph: str) -> tuple[int, ...]:
    """The batches `graph` is compiled at: 1 for the prefill graphs; the buckets for verify; the
    speculating buckets for draft."""
    if graph in PREFILL_GRAPHS:
        return (1,)
    return tuple(b for b in buckets(dims.batch) if graph != "draft" or dims.speculates(b))


def traced_inputs(dims: Dims, graph: str) -> list[TensorSpec]:
    """What the plain models take when a graph is exported, before the passes change it:
    `Llama.forward` for prefill/verify(_sampled), `EagleDraft.forward` for the draft graphs (the draft
    graph is exported for one level of a dynamic block length, then unrolled)."""
    B, C, T, D1 = dims.batch, dims.prefill_chunk, dims.tree_nodes, dims.tree_depth + 1
    i64 = "int64"
    n = {"prefill": C, "verify": T, "verify_sampled": T, "draft_prefill": C, "draft": max(D1, 2)}[graph]
    lead = [TensorSpec("tokens", (B, n), i64)]
    if owner(graph) == "draft":
        lead.append(TensorSpec("features", (B, n, dims.feature_dim), dims.dtype))
    return [*lead, TensorSpec("input_pos", (B, n), i64), TensorSpec("cache_len", (B,), i64),
            *caches(dims, owner(graph))]


def check_graph(dims: Dims, graph: str, inputs: list[tuple[str, tuple, str]],
                outputs: list[tuple[str, tuple, str]], mutates: list[str]) -> None:
    """A built graph's (name, shape, dtype) inputs and outputs must be the contract's, in order,
    and it must write in place exactly the inputs the contract says it does."""
    io = graph_io(dims, graph)
    if sorted(mutates) != sorted(io.mutates):
        raise SpecCompileError(f"{graph}: writes {sorted(mutates)} in place, the engine contract "
                               f"says {sorted(io.mutates)}; this is a compiler bug")
    for what, want, got in (("inputs", io.inputs, inputs), ("outputs", io.outputs, outputs)):
        want = [(t.name, tuple(t.shape), t.dtype) for t in want]
        got = [(n, tuple(s), d) for n, s, d in got]
        if want != got:
            raise SpecCompileError(f"{graph}: {what} {got} differ from the engine contract {want} "
                                   "(spec_compiler/engine_format.py); this is a compiler bug")
