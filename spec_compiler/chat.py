"""Text -> prompt token ids, the one way: the checkpoint's chat template when it has one (a single
user turn, generation prompt added), else the plain tokenizer. Used by `spec-run`/`Engine`,
training data and evaluation alike, so every path sees the same prompts.

`check_tokenizer` runs at compile time what the runtime will do with the tokenizer an engine
ships (load it, encode a prompt through the chat template, decode token ids), so a tokenizer or
template that fails does so at compile time, naming the checkpoint, not in every `spec-run`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import SpecCompileError, brief

SAMPLE_PROMPT = "Hello! Can you write one short sentence about the sea?"


def load_tokenizer(directory: str | Path, what: str):
    """AutoTokenizer from `directory`; any failure is one SpecCompileError `what: ...`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # tokenizers raise many types; keep the reason, drop the traceback
        raise SpecCompileError(f"{what}: cannot load the tokenizer ({brief(e)}); fix or remove its "
                               "tokenizer files") from None


def encode_user_prompt(tokenizer, text: str) -> list[int]:
    if not isinstance(text, str):
        raise SpecCompileError(f"prompt: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as lone surrogates
        raise SpecCompileError(f"prompt: not valid UTF-8 text (an undecodable byte at character "
                               f"{e.start}); pass UTF-8 text") from None
    template = getattr(tokenizer, "chat_template", None)
    try:
        if template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding (a mapping); 4 returned the list itself.
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(tokenizer(text)["input_ids"])
    except Exception as e:  # jinja2 / tokenizers errors come in many types
        what = ("the chat template (chat_template.jinja or tokenizer_config.json's chat_template)"
                if template else "the tokenizer")
        raise SpecCompileError(f"{what} failed on the prompt ({brief(e)}); fix the checkpoint's "
                               "tokenizer files and compile again") from None


def decode(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except Exception as e:  # tokenizers / sentencepiece errors come in many types
        raise SpecCompileError(f"the tokenizer cannot decode token ids ({brief(e)}); fix the "
                               "checkpoint's tokenizer files and compile again") from None


def check_tokenizer(model_dir: str | Path, vocab_size: int, files: tuple[str, ...],
                    needs: tuple[str, ...] = ("tokenizer.json", "tokenizer.model")) -> None:
    """What the runtime will do with the tokenizer an engine ships, done once at compile time
    from exactly the files the engine copies (`files`; the engine has a tokenizer when one of
    `needs` is among them): load it, encode a sample prompt through the chat template (ids in
    the model's vocabulary), decode every token id. Failures name `model_dir`."""
    model_dir = Path(model_dir)
    present = [f for f in files if (model_dir / f).is_file()]
    if not any(f in present for f in needs):
        return
    with tempfile.TemporaryDirectory(prefix="spec-tokenizer-check-") as tmp:
        for f in present:
            shutil.copy2(model_dir / f, Path(tmp) / f)
        where = f"{model_dir} ({', '.join(present)})"
        tok = load_tokenizer(tmp, where)
        try:
            ids = encode_user_prompt(tok, SAMPLE_PROMPT)
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
            if bad:
                raise SpecCompileError(f"the tokenizer encodes a sample prompt to token id {bad[0]!r}, "
                                       f"outside the model's vocabulary [0, {vocab_size}); use the "
                                       "checkpoint's own tokenizer")
            decode(tok, list(range(vocab_size)))
        except SpecCompileError as e:
            raise SpecCompileError(f"{where}: {e}") from None


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """A chat (`[{"role", "content"}, ...]`, as OpenAI's chat API sends it) through the
    checkpoint's chat template with the generation prompt added: what /v1/chat/completions
    feeds the model. A checkpoint without a template cannot take a chat: SpecCompileError."""
    if not getattr(tokenizer, "chat_template", None):
        raise SpecCompileError("this model has no chat template (the checkpoint ships none); use "
                               "/v1/completions with a plain prompt")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja2 raises many types (a template may also reject a role)
        raise SpecCompileError(f"the chat template failed on these messages ({brief(e)})") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
