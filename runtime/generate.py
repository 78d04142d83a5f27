"""The host loop: prefill in fixed chunks, then replay draft + verify until a stop condition.

Greedy output is token-identical to plain greedy decoding with the target: the verify graph
accepts a drafted token only where it equals the target's own argmax, and always adds the
target's next token (the bonus). Host work per step is reading n_acc and acc_tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spec_compiler.errors import SpecCompileError


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

    def to_json(self) -> dict:
        d = asdict(self)
        if d["text"] is None:
            del d["text"]
        d["tokens_per_second"] = len(self.output_ids) / self.seconds if self.seconds > 0 else None
        return d


class Engine:
    def __init__(self, spec, graphs, state, tokenizer_dir: Path | None):
        self.spec, self.graphs, self.state = spec, graphs, state
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None
        t = spec.tree
        # A step writes at most max(T, D+1) slots past cache_len.
        self.step_scratch = max(t.n_nodes, t.max_depth + 1)
        self._init_step_buffers()

    @classmethod
    def load(cls, engine_dir, device: str | None = None) -> "Engine":
        from .loader import load

        return load(engine_dir, device)

    # ---- tokenizer ----
    @property
    def tokenizer(self):
        if self._tokenizer is None and self.tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        return self._tokenizer

    def encode_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise SpecCompileError("this engine has no tokenizer (the checkpoint had none); "
                                   "pass --prompt-ids instead of --prompt")
        if tok.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return tok(text)["input_ids"]

    # ---- generation ----
    def check_request(self, n_prompt: int, max_new_tokens: int | None) -> None:
        s = self.spec
        if n_prompt < 1:
            raise SpecCompileError("empty prompt: give at least one token")
        padded = -(-n_prompt // s.prefill_chunk) * s.prefill_chunk
        need = n_prompt + (max_new_tokens or 1) + self.step_scratch
        if padded > s.max_seq_len or need > s.max_seq_len:
            raise SpecCompileError(
                f"request does not fit: prompt ({n_prompt} tokens) + max-new-tokens "
                f"({max_new_tokens or 1}) + tree scratch ({self.step_scratch}) = {need} exceeds the "
                f"engine's max-seq-len {s.max_seq_len}; shorten the prompt or lower "
                "--max-new-tokens, or compile with a larger --max-seq-len")

    def _validate_ids(self, ids: list[int]) -> None:
        V = self.spec.model.vocab_size
        bad = [t for t in ids if not (0 <= t < V)]
        if bad:
            raise SpecCompileError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")

    # ---- the step: device ops only, no host sync (captured as one CUDA graph on GPU) ----
    def _init_step_buffers(self) -> None:
        s, dev = self.spec, self.spec.device
        B, D1 = s.batch_size, s.tree.max_depth + 1
        n_cols = s.max_seq_len + D1 + 1  # the last column takes masked writes
        st = self.state
        st["out_buf"] = torch.zeros(B, n_cols, dtype=torch.long, device=dev)
        st["n_out"] = torch.zeros(B, dtype=torch.long, device=dev)
        st["n_steps"] = torch.zeros(B, dtype=torch.long, device=dev)
        st["accept_hist"] = torch.zeros(B, s.max_seq_len + 1, dtype=torch.long, device=dev)
        st["done"] = torch.ones(B, dtype=torch.bool, device=dev)
        st["max_new"] = torch.full((B,), s.max_seq_len, dtype=torch.long, device=dev)
        eos = list(s.model.eos_token_ids) or [-1]
        self._eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self._ar = torch.arange(D1, device=dev)
        self._captured = None

    def _step(self) -> None:
        """draft -> verify -> state update -> append emitted tokens. Finished sequences' writes
        are masked and their cache_len is clamped so replays past the end stay in bounds."""
        s, st = self.spec, self.state
        if "draft" in self.graphs:
            tree_tokens = self.graphs["draft"](st)["tree_tokens"]
        else:  # plain decoding: the tree is the root alone
            tree_tokens = st["acc_tokens"].gather(1, st["n_acc"][:, None] - 1)
        res = self.graphs["verify"](st, tokens=tree_tokens)
        active = ~st["done"]  # (B,)
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
        full = new_len + self.step_scratch > s.max_seq_len
        st["done"] |= active & (hit_eos | (st["n_out"] >= st["max_new"]) | full)
        safe = torch.clamp(new_len, max=s.max_seq_len - self.step_scratch)
        st["cache_len"].copy_(torch.where(st["done"], safe, new_len))
        st["acc_tokens"].copy_(res["acc_tokens"])
        st["acc_feats"].copy_(res["acc_feats"])
        st["n_acc"].copy_(n_acc)

    def _run_step(self) -> None:
        if self.spec.device.startswith("cuda"):
            if self._captured is None:
                from .cuda_graph import CapturedStep

                self._captured = CapturedStep(self._step)
            self._captured()
        else:
            self._step()

    def capture(self) -> None:
        """Capture the step now (CUDA), so the first generate() does not pay for it. Uses a
        harmless state (every sequence done, n_acc = 1, cache_len = 1 so the draft's catch-up
        starts at slot 0); generate() resets everything."""
        if not self.spec.device.startswith("cuda") or self._captured is not None:
            return
        with torch.inference_mode():
            st = self.state
            st["done"].fill_(True)
            st["n_acc"].fill_(1)
            st["cache_len"].fill_(1)
            self._run_step()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 sync_every: int = 4) -> GenerationResult:
        """Greedy speculative generation of one sequence. The host reads the done flag every
        `sync_every` steps (1 on CPU, where reading is free)."""
        s = self.spec
        prompt_ids = [int(t) for t in prompt_ids]
        self._validate_ids(prompt_ids)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise SpecCompileError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        self.check_request(len(prompt_ids), max_new_tokens)
        eos = set(s.model.eos_token_ids)
        cuda = s.device.startswith("cuda")
        if not cuda:
            sync_every = 1
        t0 = time.perf_counter()
        first = self._prefill(prompt_ids)
        st = self.state
        st["out_buf"][:, 0] = first
        st["n_out"].fill_(1)
        st["n_steps"].zero_()
        st["max_new"].fill_(max_new_tokens or s.max_seq_len)
        st["done"].fill_(first in eos or max_new_tokens == 1)
        st["done"] |= st["cache_len"] + self.step_scratch > s.max_seq_len
        while not bool(st["done"].all()):
            for _ in range(sync_every):
                self._run_step()
        n_out, n_steps = int(st["n_out"][0]), int(st["n_steps"][0])
        raw = st["out_buf"][0, :n_out].tolist()
        hist = st["accept_hist"][0, :n_steps].tolist()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out, stop = self._truncate(raw, eos, max_new_tokens)
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
                                seconds=seconds, prompt_tokens=len(prompt_ids),
                                accept_lengths=accepts)

    @staticmethod
    def _truncate(raw: list[int], eos: set, max_new: int | None) -> tuple[list[int], str]:
        for i, t in enumerate(raw):
            if t in eos:
                return raw[:i + 1], "eos"
            if max_new is not None and i + 1 >= max_new:
                return raw[:i + 1], "max_new_tokens"
        return raw, "length"

    def _prefill(self, prompt: list[int]) -> int:
        s, st = self.spec, self.state
        C, dev = s.prefill_chunk, s.device
        st["cache_len"].zero_()
        P = len(prompt)
        for start in range(0, P, C):
            chunk = prompt[start:start + C]
            n = len(chunk)
            toks = torch.zeros(1, C, dtype=torch.long, device=dev)
            toks[0, :n] = torch.tensor(chunk, device=dev)
            res = self.graphs["prefill"](st, tokens=toks)
            if "draft_prefill" in self.graphs:
                nxt = prompt[start + 1:start + C + 1]
                ntoks = torch.zeros(1, C, dtype=torch.long, device=dev)
                ntoks[0, :len(nxt)] = torch.tensor(nxt, dtype=torch.long, device=dev)
                self.graphs["draft_prefill"](st, tokens=ntoks, features=res["hidden"])
            st["cache_len"] += n
        first = res["logits"][0, n - 1].argmax()
        st["acc_tokens"].zero_()
        st["acc_tokens"][0, 0] = first
        st["acc_feats"][0, 0] = res["hidden"][0, n - 1]
        st["n_acc"].fill_(1)
        return int(first)

    def decode(self, ids: list[int]) -> str | None:
        tok = self.tokenizer
        return None if tok is None else tok.decode(ids, skip_special_tokens=True)
