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

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> GenerationResult:
        s = self.spec
        prompt_ids = [int(t) for t in prompt_ids]
        self._validate_ids(prompt_ids)
        self.check_request(len(prompt_ids), max_new_tokens)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise SpecCompileError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        eos = set(s.model.eos_token_ids)
        t0 = time.perf_counter()
        first = self._prefill(prompt_ids)
        out, accepts = [first], []
        stop = "eos" if first in eos else ("max_new_tokens" if max_new_tokens == 1 else None)
        st = self.state
        while stop is None:
            if int(st["cache_len"][0]) + self.step_scratch > s.max_seq_len:
                stop = "length"
                break
            if "draft" in self.graphs:
                tree_tokens = self.graphs["draft"](st)["tree_tokens"]
            else:  # plain decoding: the tree is the root alone
                tree_tokens = st["acc_tokens"].gather(1, st["n_acc"][:, None] - 1)
            res = self.graphs["verify"](st, tokens=tree_tokens)
            for k in ("acc_tokens", "acc_feats", "n_acc", "cache_len"):
                st[k].copy_(res[k])
            n = int(st["n_acc"][0])
            emitted = st["acc_tokens"][0, :n].tolist()
            kept = 0
            for t in emitted:
                out.append(t)
                kept += 1
                if t in eos:
                    stop = "eos"
                    break
                if max_new_tokens is not None and len(out) >= max_new_tokens:
                    stop = "max_new_tokens"
                    break
            accepts.append(kept)
        seconds = time.perf_counter() - t0
        calls = len(accepts)
        return GenerationResult(output_ids=out, stop_reason=stop, verify_calls=calls,
                                tokens_per_call=(sum(accepts) / calls) if calls else 0.0,
                                seconds=seconds, prompt_tokens=len(prompt_ids),
                                accept_lengths=accepts)

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
