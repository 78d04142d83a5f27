"""Helpers for the spec-serve tests: a byte-level tokenizer for the tiny models (every byte a
token, so random models write multi-byte and invalid UTF-8 too), and a server process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"]  # ids 256..259
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def add_byte_tokenizer(model_dir: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A byte-level BPE tokenizer without merges: token i < 256 is byte i, 256..259 are
    SPECIALS (<|im_end|> = 257, the tiny model's EOS when built with eos_token_id=257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    tk = Tokenizer(models.BPE({table[b]: b for b in range(256)}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(model_dir)
    return model_dir


class ServerProcess:
    """`spec-serve ENGINE --port 0 ...` as a subprocess; `.url` once it listens. One torch
    thread: a tiny model's steps are several times faster than with threads contending for
    the CI machine's two cores (the test process uses them too)."""

    def __init__(self, engine_dir: Path, *args: str, env: dict | None = None, timeout: float = 120):
        cmd = [sys.executable, "-m", "spec_compiler.serve", str(engine_dir), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.log: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"on (http://[\d.]+:\d+)", line)
            if m:
                self.url = m.group(1)
                return
        self.kill()
        raise RuntimeError("spec-serve did not start:\n" + "".join(self.log) + self.proc.stderr.read())

    def rest_of_log(self) -> str:
        return "".join(self.log) + self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
