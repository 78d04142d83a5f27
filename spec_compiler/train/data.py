"""Prompt files -> token ids.

A prompt file is JSON lines; each line is an object with either
    "prompt":    text, turned into ids with the model's tokenizer and chat template
                 (one user turn, generation prompt appended), or
    "input_ids": a list of token ids, used as they are (already templated; no tokenizer needed).
Other fields (id, category, template) are carried along and ignored. The packaged sets are
`spec_compiler/data/prompts_{train,dev}.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..chat import encode_user_prompt, load_tokenizer as load_tokenizer_from
from ..errors import SpecCompileError
from ..fileio import parse_json

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIN_PROMPTS = DATA_DIR / "prompts_train.jsonl"
DEFAULT_DEV_PROMPTS = DATA_DIR / "prompts_dev.jsonl"
# The wide training set (tools/make_prompts.py): the training split, more fills of its templates,
# train-only frames and prompts the target wrote itself; spec-corpus's default.
DEFAULT_WIDE_PROMPTS = DATA_DIR / "prompts_train_wide.jsonl"
# spec-fit-tree's: 64 of the prompts the target wrote itself, which spec-train's default prompts
# do not include (a table fitted on a draft's training prompts overstates its acceptance)
DEFAULT_FIT_PROMPTS = DATA_DIR / "prompts_fit.jsonl"


def read_prompts(path: str | Path) -> list[dict]:
    """Parse and check a prompt file; every error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SpecCompileError(f"--prompts {path}: no such file; pass a JSON-lines file with one "
                               "{\"prompt\": ...} object per line")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SpecCompileError(f"--prompts {path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = parse_json(line, f"--prompts {path}:{n}", "fix the line")
        if not isinstance(row, dict):
            raise SpecCompileError(f"--prompts {path}:{n}: expected a JSON object, found "
                                   f"{type(row).__name__}")
        text, ids = row.get("prompt"), row.get("input_ids")
        if ids is not None:
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(i, int) and i >= 0 for i in ids)):
                raise SpecCompileError(f"--prompts {path}:{n}: input_ids must be a non-empty list "
                                       "of non-negative integers")
        elif not isinstance(text, str) or not text.strip():
            raise SpecCompileError(f"--prompts {path}:{n}: needs a non-empty string field "
                                   "\"prompt\" (or a list \"input_ids\")")
        rows.append(row)
    if not rows:
        raise SpecCompileError(f"--prompts {path}: holds no prompts")
    return rows


def load_tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                   "tokenizer.model")):
        return None
    return load_tokenizer_from(model_dir, str(model_dir))


def encode_prompts(rows: list[dict], tokenizer, vocab_size: int, where: Path,
                   max_prompt_tokens: int) -> list[list[int]]:
    """Rows -> token ids (chat template for text prompts), checked against the vocabulary."""
    out = []
    for n, row in enumerate(rows):
        ids = row.get("input_ids")
        if ids is None:
            if tokenizer is None:
                raise SpecCompileError(f"--prompts {where}: text prompts need a tokenizer, and the "
                                       "model directory has none; add tokenizer files or give "
                                       "\"input_ids\"")
            ids = encode_user_prompt(tokenizer, row["prompt"])
        ids = list(ids)[-max_prompt_tokens:]  # keep the end: the generation prompt lives there
        bad = [i for i in ids if i >= vocab_size]
        if bad:
            raise SpecCompileError(f"--prompts {where}: prompt {n} has token id {bad[0]} >= the "
                                   f"model's vocab_size {vocab_size}")
        out.append(ids)
    return out


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffled prompt order: a pure function of (seed, epoch), so resume needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_prompt_ids(n_prompts: int, batch: int, index: int, seed: int) -> list[int]:
    """Prompt indices of generation batch `index` (batches walk through shuffled epochs)."""
    start = index * batch
    out = []
    while len(out) < batch:
        epoch, off = divmod(start + len(out), n_prompts)
        order = prompt_order(n_prompts, seed, epoch)
        out += order[off:off + batch - len(out)]
    return out
