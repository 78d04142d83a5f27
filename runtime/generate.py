"""The host loop: prefill in fixed chunks, then replay draft + verify until a stop condition.

Greedy output is token-identical to plain greedy decoding with the target: the verify graph
accepts a drafted token only where it equals the target's own argmax, and always adds the
target's next token (the bonus). Host work per step is none: the step (draft, verify + accept,
the state update and the output append) runs on the device, as one CUDA graph on a GPU, and the
host reads the done flags every few steps.

Public API (the benchmarks use nothing else):
    Engine.load(dir)                 an engine, loaded (runtime/loader.py)
    engine.generate(ids, ...)        one whole generation -> GenerationResult
    engine.generate_batch(prompts, ...)  many, batched, queued beyond the slots -> results in order
    engine.start(ids, max_new)       prefill a prompt into slot 0 and arm the step state
    engine.start_synthetic(n)        the same without a prompt: random context of n cache slots
    engine.step()                    one chunk of every pending prefill, then one speculative
                                     step of every live slot (a CUDA-graph replay on a GPU)
    engine.running()                 whether any sequence still runs (reads the device)
    engine.result()                  the finished generation of start()
    engine.admit(ids, ...)           a request into the lowest free slot -> slot index
    engine.finished()                {slot: GenerationResult} of the finished slots, now free
    engine.progress(since)           each live slot's output tokens so far (for streaming)
    engine.cancel(slot)              drop a slot's request, free the slot
    engine.call(graph, **args)       one step graph, its other inputs read from the state
    engine.capture()                 capture the step now, so the first generate() does not
    engine.session()                 `with engine.session():` drive start/step/result undisturbed

Slots. The state has one row per slot, for the largest batch bucket (engine_format). A slot is
free, pending (admitted, its prompt being prefilled, one chunk per step()), live (armed,
decoding) or finished (done, until finished() reads it). A step runs the smallest compiled
bucket b that holds the highest live slot, over slots [0, b), as views of the state. Slots are
a table, not a compacted list: a sequence stays in its slot from admission to the end, and
admission takes the lowest free slot. Why: compacting live sequences into the first k rows
would move their KV caches (the largest state, gigabytes at scale) whenever one in the middle
finishes, and a CUDA graph captured per bucket needs fixed buffers; a prefix view costs
nothing. The price: a hole below the highest live slot keeps the larger bucket, computing (and
masking) the hole's row, until it closes; filling the lowest hole first closes holes as soon as
requests wait, and when none wait the batch only shrinks.
Trees per bucket (engine_format): the step at bucket b runs b's tree; where it is chain-0 no
draft graph runs, and in an engine that mixes plain and speculative buckets a slot that decoded
plainly has its draft cache caught up (`_catch_up`, one host-side draft_prefill pass over the
gap) before its next speculative step. Greedy tokens never depend on the tree; sampled tokens
for a seed do (the draws are keyed per tree node), so with trees per bucket they depend on the
buckets a sequence ran in, i.e. on its batch-mates; with one tree, on the seed alone.
Slots in a bucket that are not live are parked (engine_format: n_acc = 1, cache_len one past
their valid data), so the graphs' writes for them land in their own scratch rows, and the step
keeps their state as it was; their outputs are dropped.

Threads: an Engine holds one set of state buffers, so calls are serialised by `engine.lock` (a
reentrant lock). generate() and generate_batch() hold it for the whole generation; every other
public call holds it for that call. The start() -> step()... -> result() protocol (and admit ->
step -> finished) spans calls: a thread driving it must hold the lock throughout, `with
engine.session(): ...`, or another thread's generate() may run in between and overwrite the
state. Other threads' calls wait until the session ends. start(), generate() and
generate_batch() free every slot first.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spec_compiler import engine_format as fmt
from spec_compiler import sampling
from spec_compiler.chat import decode, encode_user_prompt, load_tokenizer
from spec_compiler.errors import SpecCompileError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_ids(prompt_ids) -> list[int]:
    """A prompt as a list of Python ints: a list (or tuple, or 1-D integer tensor) of integer ids;
    a string is not one (encode text with `encode_prompt`), nor are booleans or floats."""
    if isinstance(prompt_ids, (str, bytes)):
        raise SpecCompileError(f"prompt ids: got a {type(prompt_ids).__name__} ({prompt_ids[:20]!r}); "
                               "pass a list of token ids (encode text with engine.encode_prompt)")
    try:
        items = list(prompt_ids)
    except TypeError:
        raise SpecCompileError(f"prompt ids: got {type(prompt_ids).__name__}; pass a list of token "
                               "ids") from None
    ids = []
    for t in items:
        try:
            if isinstance(t, bool) or isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                raise TypeError
            ids.append(operator.index(t))  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            raise SpecCompileError(f"prompt ids: {t!r} is not an integer token id; pass a list of "
                                   "token ids") from None
    return ids


@dataclass
class GenerationResult:
    output_ids: list[int]
    stop_reason: str  # eos | max_new_tokens | length
    verify_calls: int
    tokens_per_call: float
    seconds: float
    prompt_tokens: int
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per verify call
    text: str | None = None
    seed: int | None = None  # the seed that replays a sampled generation (None when greedy)

    def to_json(self) -> dict:
        d = asdict(self)
        if d["text"] is None:
            del d["text"]  # (seed stays: null at temperature 0)
        d["tokens_per_second"] = len(self.output_ids) / self.seconds if self.seconds > 0 else None
        return d


def _locked(method):
    """The method runs holding `self.lock` (see the module docstring)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return run


def check_sampling(temperature, top_p, top_k, seed) -> tuple[float, float, int, int | None]:
    """Validated (temperature, top_p, top_k, seed); at temperature > 0 a missing seed is drawn.
    Raises SpecCompileError naming the bad value."""
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not real(temperature) or temperature < 0:
        raise SpecCompileError(f"--temperature {temperature!r}: must be a number >= 0 (0 is greedy)")
    if not real(top_p) or not 0 < top_p <= 1:
        raise SpecCompileError(f"--top-p {top_p!r}: must be in (0, 1] (1 is no restriction)")
    if not _is_int(top_k) or top_k < 0:
        raise SpecCompileError(f"--top-k {top_k!r}: must be an integer >= 0 (0 is no restriction)")
    if seed is not None and (not _is_int(seed) or not -(1 << 63) <= seed < (1 << 63)):
        raise SpecCompileError(f"--seed {seed!r}: must be an integer that fits in 64 bits")
    if temperature == 0:
        return 0.0, float(top_p), top_k, None
    return float(temperature), float(top_p), top_k, secrets.randbits(63) if seed is None else seed


@dataclass
class _Slot:
    """A slot's request, as the host knows it (the device state holds the rest)."""

    prompt: list[int]
    max_new: int | None
    knobs: tuple[float, float, int, int | None]  # temperature, top_p, top_k, seed
    t0: float
    prefilled: int = 0  # prompt tokens in the cache so far
    live: bool = False  # armed: decoding (or finished, until finished() reads it)
    behind: bool = False  # ran plain steps since its last speculative one: the draft must catch up


class Engine:
    def __init__(self, spec, graphs, state, tokenizer_dir: Path | None):
        """`graphs`: batch -> name -> loader.Graph (the prefill graphs at batch 1, the step
        graphs at every bucket)."""
        self.spec, self.state = spec, state
        self.dims = spec.dims
        self.max_batch = self.dims.batch
        self.buckets = fmt.buckets(self.max_batch)
        # Per bucket: the prefill graphs (batch 1) and that bucket's step graphs (no draft where
        # its tree is chain-0: engine_format, per-bucket trees).
        prefill = {k: g for k, g in graphs.get(1, {}).items() if k in fmt.PREFILL_GRAPHS}
        self._bucket_graphs = {b: {**prefill, **graphs.get(b, {})} for b in self.buckets}
        # By name: the prefill graphs and the step graphs at the largest bucket (call()).
        self.graphs = self._bucket_graphs[self.max_batch]
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None
        dev = spec.device
        eos = list(spec.model.eos_token_ids) or [-1]
        self._eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self._ar = torch.arange(self.dims.tree_depth + 1, device=dev)
        # CUDA: captured graphs (`_graph`), a step per (verify, bucket), a prefill chunk per
        # ("prefill", slot); every slot's prefill graph in one memory pool (they never run at once)
        self._captured: dict[tuple[str, int], object] = {}
        self._pf_pool = None
        # Prefill's inputs and outputs, static (a captured prefill reads and writes these, not
        # fresh tensors): the chunk's tokens, the draft's (one position on), the chunk's first
        # position, its last real one, and that position's logits and feature (`_prefill_run`).
        C = self.dims.prefill_chunk
        self._pf_tokens = torch.zeros(1, C, dtype=torch.long, device=dev)
        self._pf_draft_tokens = torch.zeros(1, C, dtype=torch.long, device=dev)
        self._pf_start = torch.zeros(1, dtype=torch.long, device=dev)
        self._pf_last = torch.zeros(1, dtype=torch.long, device=dev)
        self._pf_out: dict[str, torch.Tensor] = {}  # "logits" (1, V), "hidden" (1, F): made by the first prefill
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (first, end) -> state rows
        self._slots: list[_Slot | None] = [None] * self.max_batch
        # Where Engine.load spent its time (seconds): check (manifest + fingerprint: every file
        # hashed), weights (read and placed on the device), graphs (artifacts), state, total.
        self.load_seconds: dict[str, float] = {}
        self.state_bytes = 0  # bytes of the state (caches for every slot), set by Engine.load
        self.lock = threading.RLock()  # serialises every call on the state (module docstring)
        self._tokenizer_lock = threading.Lock()
        self._free_all()

    @classmethod
    def load(cls, engine_dir, device: str | None = None) -> "Engine":
        from .loader import load

        return load(engine_dir, device)

    @property
    def step_scratch(self) -> int:
        """Cache slots past cache_len one step writes (engine_format.step_slots)."""
        return self.dims.step_slots

    # ---- tokenizer ----
    @property
    def tokenizer(self):
        with self._tokenizer_lock:  # loaded once; a fast tokenizer is not safe to share unlocked
            if self._tokenizer is None and self.tokenizer_dir is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_dir, f"engine {self.tokenizer_dir.parent}")
        return self._tokenizer

    def encode_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise SpecCompileError("this engine has no tokenizer (the checkpoint had none); "
                                   "pass --prompt-ids instead of --prompt")
        with self._tokenizer_lock:
            return encode_user_prompt(tok, text)

    def decode(self, ids: list[int]) -> str | None:
        tok = self.tokenizer
        if tok is None:
            return None
        with self._tokenizer_lock:
            return decode(tok, ids)

    # ---- requests ----
    def check_request(self, n_prompt: int, max_new_tokens: int | None) -> None:
        d = self.dims
        if n_prompt < 1:
            raise SpecCompileError("empty prompt: give at least one token")
        if not d.fits(n_prompt, max_new_tokens or 1):
            need = n_prompt + (max_new_tokens or 1) + d.step_slots
            raise SpecCompileError(
                f"request does not fit: prompt ({n_prompt} tokens) + max-new-tokens "
                f"({max_new_tokens or 1}) + one step's scratch ({d.step_slots}) = {need} exceeds "
                f"the engine's max-seq-len {d.max_seq_len}; shorten the prompt or lower "
                "--max-new-tokens, or compile with a larger --max-seq-len")

    def _validate_ids(self, ids: list[int]) -> None:
        V = self.spec.model.vocab_size
        bad = [t for t in ids if not (0 <= t < V)]
        if bad:
            raise SpecCompileError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")

    def _check(self, prompt_ids, max_new_tokens=None, temperature=0.0, top_p=1.0, top_k=0,
              seed=None) -> _Slot:
        """A request validated (ids, max_new_tokens, sampling, capacity), not yet admitted; at
        temperature > 0 without a seed, a fresh seed is drawn here."""
        prompt_ids = _token_ids(prompt_ids)
        self._validate_ids(prompt_ids)
        if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
            raise SpecCompileError(f"--max-new-tokens {max_new_tokens!r}: must be an integer >= 1")
        knobs = check_sampling(temperature, top_p, top_k, seed)
        if knobs[0] > 0 and "verify_sampled" not in self.graphs:
            raise SpecCompileError("this engine was compiled with --no-sampling: it decodes greedily "
                                   "only; use --temperature 0, or rebuild it without --no-sampling")
        self.check_request(len(prompt_ids), max_new_tokens)
        return _Slot(prompt_ids, max_new_tokens, knobs, 0.0)

    # ---- public step API ----
    @contextlib.contextmanager
    def session(self):
        """`with engine.session():` the calling thread alone uses the engine until the block ends
        (start -> step... -> result without another thread's call in between); other threads'
        calls wait. Reentrant: generate() and the step calls work inside."""
        with self.lock:
            yield self

    @_locked
    def call(self, graph: str, **args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one step graph; inputs not given are read from the engine state (caches are
        updated in place). Returns its outputs by name (engine_format.graph_io). A graph of
        batch b runs over slots [0, b): the prefill graphs over slot 0, the step graphs at the
        largest bucket over every slot."""
        if graph not in self.graphs:
            raise SpecCompileError(f"this engine has no {graph!r} graph (it has {sorted(self.graphs)})")
        return self.graphs[graph](self.state, **args)

    @_locked
    @torch.inference_mode()
    def start(self, prompt_ids: list[int], max_new_tokens: int | None = None,
              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
              seed: int | None = None) -> None:
        """Validate and prefill a prompt into slot 0 and arm the step state (every other slot
        is freed); step() then generates. Sampling parameters as in `generate`."""
        req = self._check(prompt_ids, max_new_tokens, temperature, top_p, top_k, seed)
        self._free_all()
        slot = self._admit(req)
        while not self._slots[slot].live:
            self._prefill_chunk(slot)

    @_locked
    @torch.inference_mode()
    def admit(self, prompt_ids: list[int], max_new_tokens: int | None = None,
              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
              seed: int | None = None) -> int:
        """Validate a request and take the lowest free slot for it; returns the slot. Its prompt
        is prefilled by the next step() calls, one chunk per call (the other slots keep
        decoding in between), and it decodes from the step after its last chunk. Raises
        SpecCompileError when every slot is taken (see free_slots())."""
        req = self._check(prompt_ids, max_new_tokens, temperature, top_p, top_k, seed)
        if not self.free_slots():
            raise SpecCompileError(f"no free slot: all {self.max_batch} slots are taken; read "
                                   "finished() or cancel() one first (the engine was built with "
                                   f"--max-batch {self.max_batch})")
        return self._admit(req)

    @_locked
    def free_slots(self) -> int:
        """How many slots admit() can take now (host bookkeeping: no device read)."""
        return self._slots.count(None)

    @_locked
    @torch.inference_mode()
    def cancel(self, slot: int) -> None:
        """Drop the request in `slot` (pending, live or finished) and free the slot; its
        result is never returned."""
        if not _is_int(slot) or not 0 <= slot < self.max_batch or self._slots[slot] is None:
            raise SpecCompileError(f"cancel({slot!r}): no request in that slot (slots in use: "
                                   f"{[i for i, s in enumerate(self._slots) if s is not None]})")
        self._free(slot)

    @_locked
    @torch.inference_mode()
    def finished(self) -> dict[int, GenerationResult]:
        """The finished sequences by slot (reads the done flags from the device); their slots
        are free again."""
        live = [i for i, s in enumerate(self._slots) if s is not None and s.live]
        if not live:
            return {}
        done = self.state["done"][:max(live) + 1].tolist()
        out = {}
        for i in live:
            if done[i]:
                out[i] = self._result(i)
                self._free(i)
        return out

    @_locked
    @torch.inference_mode()
    def progress(self, since: dict[int, int] | None = None) -> dict[int, list[int]]:
        """The output tokens of every live slot (done or not) from index `since.get(slot, 0)`
        on: for streaming, read after each step() (a server passes how many it already has, so
        each read moves only the new tokens). Raw: the last step's tokens may run past an EOS or
        max_new_tokens, which finished() truncates; the caller truncates the same way. Two small
        device reads (the lengths, then the new columns of the live rows)."""
        live = [i for i, s in enumerate(self._slots) if s is not None and s.live]
        if not live:
            return {}
        since = since or {}
        hi = max(live) + 1
        n_out = self.state["n_out"][:hi].tolist()
        lo = min(since.get(i, 0) for i in live)
        end = max(n_out[i] for i in live)
        rows = self.state["out_buf"][:hi, lo:end].tolist() if end > lo else [[] for _ in range(hi)]
        return {i: rows[i][since.get(i, 0) - lo:n_out[i] - lo] for i in live}

    @_locked
    @torch.inference_mode()
    def start_synthetic(self, context_len: int, seed: int = 0, batch: int | None = None,
                        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> None:
        """Arm slots [0, batch) (default: all) over a random context of `context_len` cache
        slots (random cache contents, root token and features) without a prompt: for timing
        steps at a given context and batch, greedy or (temperature > 0) sampled with slot i's
        seed `seed + i`. Generation runs until the capacity or max_seq_len tokens."""
        d = self.dims
        if not 1 <= context_len <= d.max_seq_len - d.step_slots:
            raise SpecCompileError(f"context {context_len}: must be in [1, "
                                   f"{d.max_seq_len - d.step_slots}] for this engine")
        batch = self.max_batch if batch is None else batch
        if not _is_int(batch) or not 1 <= batch <= self.max_batch:
            raise SpecCompileError(f"batch {batch!r}: must be in [1, {self.max_batch}] for this engine")
        temperature, top_p, top_k, _ = self._check([0], None, temperature, top_p, top_k, seed).knobs
        self._free_all()
        g = torch.Generator(device=self.spec.device).manual_seed(seed)
        st = self.state
        for k, v in st.items():
            if k.startswith(("target.", "draft.")):
                v.normal_(generator=g)
        st["acc_tokens"].random_(0, self.spec.model.vocab_size, generator=g)
        st["acc_feats"].normal_(generator=g)
        t0 = time.perf_counter()
        for i in range(batch):
            knobs = (temperature, top_p, top_k, seed + i if temperature > 0 else None)
            self._slots[i] = _Slot([0] * context_len, None, knobs, t0, context_len)
            self._set_sampling(i, *self._slots[i].knobs)
            self._arm(i, st["acc_tokens"][i, 0].clone(), st["acc_feats"][i, 0].clone(), context_len, None,
                      check_eos=False)

    @_locked
    @torch.inference_mode()
    def step(self) -> None:
        """One prefill chunk of every pending slot, then one speculative step of every live
        slot: the smallest bucket that holds them, one CUDA-graph replay on a GPU."""
        for i, s in enumerate(self._slots):
            if s is not None and not s.live:
                self._prefill_chunk(i)
        live = [i for i, s in enumerate(self._slots) if s is not None and s.live]
        if not live:
            return
        b = next(b for b in self.buckets if b > max(live))
        if self.dims.mixed:  # the draft's cache across plain and speculative buckets
            for i in live:
                if not self.dims.speculates(b):
                    self._slots[i].behind = True
                elif self._slots[i].behind:
                    self._catch_up(i)
        sampled = any(self._slots[i].knobs[0] > 0 for i in live)
        verify = "verify_sampled" if sampled else "verify"
        if self.spec.device.startswith("cuda"):
            self._graph((verify, b), functools.partial(self._step, b, verify))()
        else:
            self._step(b, verify)

    @_locked
    def running(self) -> bool:
        """Whether a sequence is pending or live and not done (reads the device)."""
        if any(s is not None and not s.live for s in self._slots):
            return True
        st = self.state
        return bool((st["slot_valid"] & ~st["done"]).any())

    @_locked
    def capture(self) -> None:
        """Capture the step of every bucket now (CUDA), so the first generate() does not pay for
        it. Runs on parked slots only (every slot freed: nothing live is written). A slot's
        prefill chunk is captured at its first admission (`_prefill_chunk`)."""
        if not self.spec.device.startswith("cuda"):
            return
        self._free_all()
        for b in self.buckets:
            for verify in ("verify", "verify_sampled"):
                if verify in self.graphs:
                    self._graph((verify, b), functools.partial(self._step, b, verify))

    @_locked
    @torch.inference_mode()
    def result(self) -> GenerationResult:
        """The generation armed by start(), read back once it has stopped."""
        if self._slots[0] is None or not self._slots[0].live:
            raise SpecCompileError("no generation to read: call start() first")
        return self._result(0)

    @_locked
    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, sync_every: int = 4) -> GenerationResult:
        """Speculative generation of one sequence, holding `self.lock` throughout (other
        threads' calls wait). temperature 0 is greedy (token-identical to the target's greedy
        decoding); above 0 the output is distributed exactly as the target's sampling with that
        temperature, then top-k (0: none), then top-p (1: none), as transformers warps them. With
        temperature > 0 and no seed, a fresh seed is drawn and reported (`result.seed`): the same
        seed gives the same tokens. The host reads the done flag every `sync_every` steps (1 on
        CPU, where reading is free)."""
        sync_every = self._sync_every(sync_every)
        self.start(prompt_ids, max_new_tokens, temperature, top_p, top_k, seed)
        while self.running():
            for _ in range(sync_every):
                self.step()
        res = self.result()
        self._free(0)
        return res

    @_locked
    def generate_batch(self, prompts: list[list[int]], max_new_tokens=None, temperature=0.0,
                       top_p=1.0, top_k=0, seed=None, sync_every: int = 4,
                       max_live: int | None = None) -> list[GenerationResult]:
        """Generate every prompt, up to `max_batch` at once in slots (`max_live`: fewer; slots are
        taken lowest first, so the steps then run the bucket that holds `max_live`), the rest
        queued and admitted as slots free up; results in input order, each with its own stop_reason, verify_calls,
        tokens_per_call and accept_lengths (and seconds: from its admission to its end). Each
        keyword is one value for all prompts or a list of one per prompt; a single seed gives
        prompt i the seed `seed + i`. Every request is checked before anything runs. Each
        sequence's output is what generate() gives it alone: greedy, the same tokens; sampled,
        the same tokens for the same seed, whatever its batch-mates and slot, when every bucket
        has the same tree (else exactly distributed, module docstring). Holds the lock
        throughout and frees every slot first."""
        from .batch import expand_requests

        sync_every = self._sync_every(sync_every)
        if max_live is None:
            max_live = self.max_batch
        if not _is_int(max_live) or not 1 <= max_live <= self.max_batch:
            raise SpecCompileError(f"max_live={max_live!r}: must be an integer from 1 to {self.max_batch} "
                                   f"(the engine was built with --max-batch {self.max_batch})")
        reqs = [self._check(*r) for r in expand_requests(prompts, max_new_tokens, temperature,
                                                         top_p, top_k, seed)]
        results: list[GenerationResult | None] = [None] * len(reqs)
        queue = list(range(len(reqs)))[::-1]  # popped from the end: input order
        owner: dict[int, int] = {}  # slot -> request index
        self._free_all()
        while queue or owner:
            while queue and len(owner) < max_live and self.free_slots():
                r = queue.pop()
                owner[self._admit(reqs[r])] = r
            for _ in range(sync_every):
                self.step()
            for slot, res in self.finished().items():
                results[owner.pop(slot)] = res
        return results

    # ---- internals ----
    def _sync_every(self, sync_every) -> int:
        if not _is_int(sync_every) or sync_every < 1:
            raise SpecCompileError(f"sync_every={sync_every!r}: must be an integer >= 1")
        return sync_every if self.spec.device.startswith("cuda") else 1

    def _graph(self, key: tuple[str, int], fn, pool=None):
        """The CUDA graph of `fn` under `key` in `_captured`, captured on first use."""
        if key not in self._captured:
            from .cuda_graph import CapturedStep

            self._captured[key] = CapturedStep(fn, pool=pool)
        return self._captured[key]

    def _view(self, first: int, end: int) -> dict[str, torch.Tensor]:
        """The state rows of slots [first, end), as views (made once: the state tensors are
        never reallocated, only written in place)."""
        if (first, end) not in self._views:
            self._views[(first, end)] = {k: v[first:end] for k, v in self.state.items()}
        return self._views[(first, end)]

    def _admit(self, req: _Slot) -> int:
        """Put a checked request into the lowest free slot, pending: prefilled by step()."""
        i = self._slots.index(None)
        req.t0 = time.perf_counter()
        self._slots[i] = req
        self._set_sampling(i, *req.knobs)
        self._park(i, 0)
        return i

    def _free_all(self) -> None:
        self._slots = [None] * self.max_batch
        self._park(slice(None), 0)

    def _free(self, i: int) -> None:
        self._slots[i] = None
        self._park(i, 0)

    def _park(self, i: int | slice, valid_len: int) -> None:
        """Slot i is not live: masked in every step, whose writes for it land at or past
        `valid_len` in its own cache rows (engine_format: parked slots)."""
        st = self.state
        st["slot_valid"][i].fill_(False)
        st["done"][i].fill_(True)
        st["n_acc"][i].fill_(1)
        st["cache_len"][i].fill_(valid_len + 1)

    def _set_sampling(self, i: int, temperature: float, top_p: float, top_k: int,
                      seed: int | None) -> None:
        st = self.state
        st["temperature"][i].fill_(temperature)
        st["top_p"][i].fill_(top_p)
        st["top_k"][i].fill_(top_k)
        st["seed"][i].fill_(0 if seed is None else seed)

    def _prefill_chunk(self, i: int) -> None:
        """The next prefill chunk of pending slot i, run over that slot's rows alone (the
        prefill graphs have batch 1); after the last one the slot is armed. No host sync: the
        chunk's tokens go up in one asynchronous copy (pinned on CUDA), and the first token
        stays on the device (`_arm`), so the host runs ahead of the GPU through admissions as
        through steps. On CUDA the chunk (both graphs) is one replay of a CUDA graph captured
        for this slot (its state rows are fixed buffers), all slots' graphs in one memory pool."""
        s, C = self._slots[i], self.dims.prefill_chunk
        start, P = s.prefilled, len(s.prompt)
        n = min(C, P - start)
        host = torch.zeros(2, C, dtype=torch.long)
        ids = torch.tensor(s.prompt[start:start + C + 1], dtype=torch.long)
        host[0, :n] = ids[:n]
        host[1, :len(ids) - 1] = ids[1:]  # the draft pairs each position with the next token
        cuda = self.spec.device.startswith("cuda")
        if cuda:
            host = host.pin_memory()
        self._pf_tokens.copy_(host[:1], non_blocking=cuda)
        self._pf_draft_tokens.copy_(host[1:], non_blocking=cuda)
        self._pf_start.fill_(start)
        self._pf_last.fill_(n - 1)
        if cuda:
            if self._pf_pool is None:
                self._pf_pool = torch.cuda.graph_pool_handle()
            self._graph(("prefill", i), functools.partial(self._prefill_run, i), self._pf_pool)()
        else:
            self._prefill_run(i)
        s.prefilled += n
        if s.prefilled < P:
            self._park(i, s.prefilled)
            return
        first = self._first_token(i, self._pf_out["logits"], P)
        self._arm(i, first, self._pf_out["hidden"][0], P, s.max_new)

    def _prefill_run(self, i: int) -> None:
        """Prefill (and the draft's prefill) of the chunk in the static inputs over slot i's
        rows; the last real position's logits and feature land in `_pf_out`. Touches only
        fixed buffers, so it can be captured."""
        v, g = self._view(i, i + 1), self._bucket_graphs[1]
        v["cache_len"].copy_(self._pf_start)
        res = g["prefill"](v, tokens=self._pf_tokens)
        if "draft_prefill" in g:
            g["draft_prefill"](v, tokens=self._pf_draft_tokens, features=res["hidden"])
        for k in ("logits", "hidden"):
            last = res[k].index_select(1, self._pf_last)[:, 0]
            if k not in self._pf_out:  # the first (uncaptured) prefill makes the buffers, as
                with torch.inference_mode(False):  # state: writable outside inference mode too
                    self._pf_out[k] = torch.empty_like(last)
            self._pf_out[k].copy_(last)

    def _arm(self, i: int, first: torch.Tensor, feat: torch.Tensor, cache_len: int,
             max_new_tokens: int | None, check_eos: bool = True) -> None:
        """Slot i's state for a sequence whose first emitted token is `first` (a 0-d tensor on
        the device: the root, with feature `feat`) over `cache_len` cache slots; nothing is read
        back (whether `first` is an EOS is decided on the device). Every row the slot's reads
        could see is written here, so nothing of a previous occupant leaks. Writes are in-place
        fills and copies: assigning a Python scalar to a CUDA element copies from pageable host
        memory, a host sync (so in `_park` and `_set_sampling` too)."""
        d, st = self.dims, self.state
        st["acc_tokens"][i].zero_()
        st["acc_tokens"][i, 0].copy_(first)
        st["acc_feats"][i].zero_()
        st["acc_feats"][i, 0].copy_(feat)
        st["n_acc"][i].fill_(1)
        st["cache_len"][i].fill_(cache_len)
        if d.mixed:  # draft_prefill wrote the prompt's pairs; the last one is pending
            st["draft_len"][i].fill_(cache_len - 1)
        st["out_buf"][i].zero_()
        st["out_buf"][i, 0].copy_(first)
        st["accept_hist"][i].zero_()
        st["n_out"][i].fill_(1)
        st["n_steps"][i].fill_(0)
        st["max_new"][i].fill_(max_new_tokens or d.max_seq_len)
        stop = max_new_tokens == 1 or cache_len + d.step_slots > d.max_seq_len
        if check_eos:
            st["done"][i].copy_((first == self._eos).any() | stop)
        else:
            st["done"][i].fill_(stop)
        st["slot_valid"][i].fill_(True)
        self._slots[i].live = True

    def _catch_up(self, i: int) -> None:
        """Slot i ran plain steps (no draft graph): write the draft's cache over that gap,
        [draft_len, cache_len - n_acc), from the pairs those steps recorded (`hist_*`), with
        draft_prefill over slot i's rows, a chunk at a time; the next draft graph's catch-up
        then writes the pending pairs as after any step. Reads the device (host loop, outside
        a captured step): it runs only when a slot moves from a plain bucket to a speculative
        one."""
        st, C = self.state, self.dims.prefill_chunk
        self._slots[i].behind = False
        if bool(st["done"][i]):
            return
        g0, g1 = int(st["draft_len"][i]), int(st["cache_len"][i] - st["n_acc"][i])
        v = self._view(i, i + 1)
        dev = self.spec.device
        for start in range(g0, g1, C):
            n = min(C, g1 - start)
            toks = torch.zeros(1, C, dtype=torch.long, device=dev)
            feats = torch.zeros(1, C, self.dims.feature_dim, dtype=st["hist_feats"].dtype, device=dev)
            toks[0, :n] = st["hist_tokens"][i, start:start + n]
            feats[0, :n] = st["hist_feats"][i, start:start + n]
            at = {**v, "cache_len": torch.tensor([start], device=dev)}
            self._bucket_graphs[1]["draft_prefill"](at, tokens=toks, features=feats)
        st["draft_len"][i] = g1

    def _step(self, b: int, verify: str) -> None:
        """draft -> verify -> state update -> append emitted tokens, over slots [0, b). Slots
        that are not live (not slot_valid, or done) keep their state and write no output;
        a sequence that finishes gets its cache_len clamped so later replays stay in bounds.
        A bucket whose tree is chain-0 runs no draft graph: in a mixed engine it records the
        pending pairs (which the draft graph would have written into the draft's cache) for
        the catch-up (`_catch_up`); a speculative one advances draft_len."""
        d, st, graphs = self.dims, self._view(0, b), self._bucket_graphs[b]
        if "draft" in graphs:
            tree_tokens = graphs["draft"](st)["tree_tokens"]
        else:  # plain decoding: the tree is the root alone
            tree_tokens = st["acc_tokens"].gather(1, st["n_acc"][:, None] - 1)
            if d.mixed:  # pair j at position cache_len - n_acc + j (padding past n_acc: rewritten later)
                pos = (st["cache_len"] - st["n_acc"])[:, None] + self._ar[None, :]
                st["hist_tokens"].scatter_(1, pos, st["acc_tokens"])
                st["hist_feats"].scatter_(1, pos[..., None].expand_as(st["acc_feats"]), st["acc_feats"])
        res = graphs[verify](st, tokens=tree_tokens)
        active = ~st["done"] & st["slot_valid"]  # (b,)
        n_acc = res["n_acc"]
        valid = (self._ar[None, :] < n_acc[:, None]) & active[:, None]  # (b, D+1)
        trash = st["out_buf"].shape[1] - 1
        cols = torch.where(valid, st["n_out"][:, None] + self._ar[None, :], trash)
        st["out_buf"].scatter_(1, cols, res["acc_tokens"])
        hist_col = torch.where(active, st["n_steps"], st["accept_hist"].shape[1] - 1)
        st["accept_hist"].scatter_(1, hist_col[:, None], n_acc[:, None])
        st["n_steps"] += active.long()
        st["n_out"] += torch.where(active, n_acc, 0)
        hit_eos = ((res["acc_tokens"][..., None] == self._eos).any(-1) & valid).any(1)
        new_len = res["cache_len"]
        full = new_len + d.step_slots > d.max_seq_len
        st["done"] |= active & (hit_eos | (st["n_out"] >= st["max_new"]) | full)
        safe = torch.clamp(new_len, max=d.max_seq_len - d.step_slots)
        new_len = torch.where(st["done"], safe, new_len)
        st["cache_len"].copy_(torch.where(active, new_len, st["cache_len"]))
        st["acc_tokens"].copy_(torch.where(active[:, None], res["acc_tokens"], st["acc_tokens"]))
        st["acc_feats"].copy_(torch.where(active[:, None, None], res["acc_feats"], st["acc_feats"]))
        st["n_acc"].copy_(torch.where(active, n_acc, st["n_acc"]))
        if d.mixed and "draft" in graphs:  # the draft's cache now holds all but the pending pairs
            st["draft_len"].copy_(torch.where(active, st["cache_len"] - st["n_acc"], st["draft_len"]))

    def _result(self, i: int) -> GenerationResult:
        """Slot i's generation, read back (it has stopped)."""
        s, st = self._slots[i], self.state
        n_out, n_steps = int(st["n_out"][i]), int(st["n_steps"][i])
        raw = st["out_buf"][i, :n_out].tolist()
        hist = st["accept_hist"][i, :n_steps].tolist()
        if self.spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - s.t0
        out, stop = self._truncate(raw, set(self.spec.model.eos_token_ids), s.max_new)
        kept, accepts = 1, []  # per verify call: tokens kept after truncation
        for h in hist:
            take = min(h, len(out) - kept)
            if take <= 0:
                break
            accepts.append(take)
            kept += take
        calls = len(accepts)
        return GenerationResult(output_ids=out, stop_reason=stop, verify_calls=calls,
                                tokens_per_call=(sum(accepts) / calls) if calls else 0.0,
                                seconds=seconds, prompt_tokens=len(s.prompt), accept_lengths=accepts,
                                seed=s.knobs[3])

    @staticmethod
    def _truncate(raw: list[int], eos: set, max_new: int | None) -> tuple[list[int], str]:
        for i, t in enumerate(raw):
            if t in eos:
                return raw[:i + 1], "eos"
            if max_new is not None and i + 1 >= max_new:
                return raw[:i + 1], "max_new_tokens"
        return raw, "length"

    def _first_token(self, i: int, logits: torch.Tensor, position: int) -> torch.Tensor:
        """Slot i's token after its prompt, on the device: the argmax, or at temperature > 0 a
        draw from the warped distribution keyed like every other (seed, its position, node 0)."""
        st = self._view(i, i + 1)
        greedy = logits[0].argmax()
        if self._slots[i].knobs[0] == 0:
            return greedy
        probs = sampling.warp(logits[:1], st["temperature"], st["top_k"], st["top_p"])
        u = sampling.uniform(st["seed"], torch.full_like(st["seed"], position), 0, sampling.BONUS)
        return sampling.sample(probs, u)[0]
