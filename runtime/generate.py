"""The host loop: prefill in fixed chunks, then replay draft + verify until a stop condition.

Greedy output is token-identical to plain greedy decoding with the target: the verify graph
accepts a drafted token only where it equals the target's own argmax, and always adds the
target's next token (the bonus). Host work per step is none: the step (draft, verify + accept,
the state update and the output append) runs on the device, as one CUDA graph on a GPU, and the
host reads the done flags every few steps.

Public API (the benchmarks use nothing else):
    Engine.load(dir)                 an engine, loaded (runtime/loader.py)
    engine.generate(ids, ...)        one whole generation -> GenerationResult
    engine.start(ids, max_new)       prefill a prompt and arm the step state
    engine.start_synthetic(n)        the same without a prompt: random context of n cache slots
    engine.step()                    one speculative step (a CUDA-graph replay on a GPU)
    engine.running()                 whether any sequence still runs (reads the device)
    engine.result()                  the finished generation
    engine.call(graph, **args)       one step graph, its other inputs read from the state
    engine.capture()                 capture the step now, so the first generate() does not
    engine.session()                 `with engine.session():` drive start/step/result undisturbed

Threads: an Engine holds one set of state buffers, so calls are serialised by `engine.lock` (a
reentrant lock). generate() holds it for the whole generation; every other public call holds it
for that call. The start() -> step()... -> result() protocol spans calls: a thread driving it
must hold the lock throughout, `with engine.session(): ...`, or another thread's generate() may
run in between and overwrite the state. Other threads' calls wait until the session ends.
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


class Engine:
    def __init__(self, spec, graphs, state, tokenizer_dir: Path | None):
        self.spec, self.graphs, self.state = spec, graphs, state
        self.dims = spec.dims
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None
        dev = spec.device
        eos = list(spec.model.eos_token_ids) or [-1]
        self._eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self._ar = torch.arange(self.dims.tree_depth + 1, device=dev)
        self._captured: dict[str, object] = {}  # CUDA: one captured step per verify graph
        self._verify = "verify"  # verify_sampled while a sequence samples (temperature > 0)
        self._request: tuple[int, int | None, float] | None = None  # prompt tokens, max_new, t0
        # Where Engine.load spent its time (seconds): check (manifest + fingerprint: every file
        # hashed), weights (read and placed on the device), graphs (artifacts), state, total.
        self.load_seconds: dict[str, float] = {}
        self.lock = threading.RLock()  # serialises every call on the state (module docstring)
        self._tokenizer_lock = threading.Lock()

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
        updated in place). Returns its outputs by name (engine_format.graph_io)."""
        if graph not in self.graphs:
            raise SpecCompileError(f"this engine has no {graph!r} graph (it has {sorted(self.graphs)})")
        return self.graphs[graph](self.state, **args)

    @_locked
    @torch.inference_mode()
    def start(self, prompt_ids: list[int], max_new_tokens: int | None = None,
              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
              seed: int | None = None) -> None:
        """Validate and prefill a prompt and arm the step state; step() then generates.
        Sampling parameters as in `generate`."""
        prompt_ids = _token_ids(prompt_ids)
        self._validate_ids(prompt_ids)
        if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
            raise SpecCompileError(f"--max-new-tokens {max_new_tokens!r}: must be an integer >= 1")
        knobs = check_sampling(temperature, top_p, top_k, seed)
        self.check_request(len(prompt_ids), max_new_tokens)
        t0 = time.perf_counter()
        self._set_sampling(*knobs)
        first = self._prefill(prompt_ids)
        self._arm(first, max_new_tokens)
        self._request = (len(prompt_ids), max_new_tokens, t0, knobs[3])

    @_locked
    @torch.inference_mode()
    def start_synthetic(self, context_len: int, seed: int = 0) -> None:
        """Arm the step state over a random context of `context_len` cache slots (random cache
        contents, root token and features) without a prompt: for timing steps at a given
        context. Generation runs until the capacity or max_seq_len tokens."""
        d = self.dims
        if not 1 <= context_len <= d.max_seq_len - d.step_slots:
            raise SpecCompileError(f"context {context_len}: must be in [1, "
                                   f"{d.max_seq_len - d.step_slots}] for this engine")
        g = torch.Generator(device=self.spec.device).manual_seed(seed)
        st = self.state
        for k, v in st.items():
            if k.startswith(("target.", "draft.")):
                v.normal_(generator=g)
        st["cache_len"].fill_(context_len)
        st["n_acc"].fill_(1)
        st["acc_tokens"].random_(0, self.spec.model.vocab_size, generator=g)
        st["acc_feats"].normal_(generator=g)
        self._set_sampling(*check_sampling(0.0, 1.0, 0, None))
        self._arm(int(st["acc_tokens"][0, 0]), None, check_eos=False)
        self._request = (context_len, None, time.perf_counter(), None)

    @_locked
    @torch.inference_mode()
    def step(self) -> None:
        """One speculative step for every live slot: one CUDA-graph replay on a GPU."""
        if self.spec.device.startswith("cuda"):
            if self._verify not in self._captured:
                from .cuda_graph import CapturedStep

                self._captured[self._verify] = CapturedStep(self._step)
            self._captured[self._verify]()
        else:
            self._step()

    @_locked
    def running(self) -> bool:
        return not bool(self.state["done"].all())

    @_locked
    def capture(self) -> None:
        """Capture the step now (CUDA), so the first generate() does not pay for it. Uses a
        harmless state (every sequence done, n_acc = 1, cache_len = 1 so the draft's catch-up
        starts at slot 0); start() resets everything."""
        if not self.spec.device.startswith("cuda"):
            return
        st = self.state
        for verify in ("verify", "verify_sampled"):
            if verify in self.graphs and verify not in self._captured:
                st["done"].fill_(True)
                st["n_acc"].fill_(1)
                st["cache_len"].fill_(1)
                self._verify = verify
                self.step()
        self._verify = "verify"

    @_locked
    @torch.inference_mode()
    def result(self) -> GenerationResult:
        """The generation armed by start(), read back once it has stopped."""
        if self._request is None:
            raise SpecCompileError("no generation to read: call start() first")
        n_prompt, max_new, t0, seed = self._request
        st = self.state
        n_out, n_steps = int(st["n_out"][0]), int(st["n_steps"][0])
        raw = st["out_buf"][0, :n_out].tolist()
        hist = st["accept_hist"][0, :n_steps].tolist()
        if self.spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out, stop = self._truncate(raw, set(self.spec.model.eos_token_ids), max_new)
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
                                seconds=seconds, prompt_tokens=n_prompt, accept_lengths=accepts,
                                seed=seed)

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
        if not _is_int(sync_every) or sync_every < 1:
            raise SpecCompileError(f"sync_every={sync_every!r}: must be an integer >= 1")
        self.start(prompt_ids, max_new_tokens, temperature, top_p, top_k, seed)
        if not self.spec.device.startswith("cuda"):
            sync_every = 1
        while self.running():
            for _ in range(sync_every):
                self.step()
        return self.result()

    # ---- internals ----
    def _set_sampling(self, temperature: float, top_p: float, top_k: int, seed: int | None) -> None:
        if temperature > 0 and "verify_sampled" not in self.graphs:
            raise SpecCompileError("this engine was compiled with --no-sampling: it decodes greedily "
                                   "only; use --temperature 0, or rebuild it without --no-sampling")
        self._verify = "verify_sampled" if temperature > 0 else "verify"
        st = self.state
        st["temperature"].fill_(temperature)
        st["top_p"].fill_(top_p)
        st["top_k"].fill_(top_k)
        st["seed"].fill_(0 if seed is None else seed)

    def _arm(self, first: int, max_new_tokens: int | None, check_eos: bool = True) -> None:
        """Slot state for a sequence whose first emitted token is `first` (already the root)."""
        d, st = self.dims, self.state
        st["out_buf"][:, 0] = first
        st["n_out"].fill_(1)
        st["n_steps"].zero_()
        st["slot_valid"].fill_(True)
        st["max_new"].fill_(max_new_tokens or d.max_seq_len)
        st["done"].fill_((check_eos and first in self.spec.model.eos_token_ids) or max_new_tokens == 1)
        st["done"] |= st["cache_len"] + d.step_slots > d.max_seq_len

    def _step(self) -> None:
        """draft -> verify -> state update -> append emitted tokens. Finished sequences' writes
        are masked and their cache_len is clamped so replays past the end stay in bounds."""
        d, st = self.dims, self.state
        if "draft" in self.graphs:
            tree_tokens = self.graphs["draft"](st)["tree_tokens"]
        else:  # plain decoding: the tree is the root alone
            tree_tokens = st["acc_tokens"].gather(1, st["n_acc"][:, None] - 1)
        res = self.graphs[self._verify](st, tokens=tree_tokens)
        active = ~st["done"] & st["slot_valid"]  # (B,)
        n_acc = res["n_acc"]
        valid = (self._ar[None, :] < n_acc[:, None]) & active[:, None]  # (B, D+1)
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
        st["cache_len"].copy_(torch.where(st["done"], safe, new_len))
        st["acc_tokens"].copy_(res["acc_tokens"])
        st["acc_feats"].copy_(res["acc_feats"])
        st["n_acc"].copy_(n_acc)

    @staticmethod
    def _truncate(raw: list[int], eos: set, max_new: int | None) -> tuple[list[int], str]:
        for i, t in enumerate(raw):
            if t in eos:
                return raw[:i + 1], "eos"
            if max_new is not None and i + 1 >= max_new:
                return raw[:i + 1], "max_new_tokens"
        return raw, "length"

    def _first_token(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """The token after the prompt, on the device: the argmax, or at temperature > 0 a draw
        from the warped distribution keyed like every other (seed, its position, node 0)."""
        st = self.state
        greedy = logits[0].argmax()
        if float(st["temperature"][0]) == 0:
            return greedy
        probs = sampling.warp(logits[:1], st["temperature"][:1], st["top_k"][:1], st["top_p"][:1])
        u = sampling.uniform(st["seed"][:1], torch.full_like(st["seed"][:1], position), 0, sampling.BONUS)
        return sampling.sample(probs, u)[0]

    def _prefill(self, prompt: list[int]) -> int:
        st, C, dev = self.state, self.dims.prefill_chunk, self.spec.device
        st["cache_len"].zero_()
        P = len(prompt)
        for start in range(0, P, C):
            chunk = prompt[start:start + C]
            n = len(chunk)
            toks = torch.zeros(1, C, dtype=torch.long, device=dev)
            toks[0, :n] = torch.tensor(chunk, device=dev)
            res = self.call("prefill", tokens=toks)
            if "draft_prefill" in self.graphs:
                nxt = prompt[start + 1:start + C + 1]
                ntoks = torch.zeros(1, C, dtype=torch.long, device=dev)
                ntoks[0, :len(nxt)] = torch.tensor(nxt, dtype=torch.long, device=dev)
                self.call("draft_prefill", tokens=ntoks, features=res["hidden"])
            st["cache_len"] += n
        first = self._first_token(res["logits"][:, n - 1], P)
        st["acc_tokens"].zero_()
        st["acc_tokens"][0, 0] = first
        st["acc_feats"][0, 0] = res["hidden"][0, n - 1]
        st["n_acc"].fill_(1)
        return int(first)
