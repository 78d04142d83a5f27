"""Resumable training checkpoints: `CKPT_DIR/step-NNNNNNN.pt`, written atomically.

One file holds everything to continue bit-for-bit where the run stopped: the draft's trained
parameters (float32), the optimizer state, the noise RNG state, the counters (step, tokens,
generation-batch index, pass and minibatch cursor), the settings that shape training, and the
current generation batch itself (tokens + target features), so a resume does not regenerate it.
Prompt order and per-batch shuffles are pure functions of (seed, index): they need no state.
Writes are atomic (`fileio.atomic_open`: a temporary file beside it, fsync'd, then renamed), so
an interrupted save leaves the older checkpoints as they were; the newest `keep` are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import SpecCompileError, brief
from ..fileio import atomic_open

_NAME = re.compile(r"^step-(\d+)\.pt$")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:07d}.pt"
    with atomic_open(path) as f:
        torch.save(state, f)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink()
    return path


def load_latest(ckpt_dir: Path) -> tuple[Path, dict]:
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise SpecCompileError(f"--resume: no checkpoint (step-N.pt) in {ckpt_dir}; start without "
                               "--resume, or pass the run's --checkpoint-dir")
    path = found[-1]
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise SpecCompileError(f"--resume: cannot read {path} ({brief(e)}); delete it to fall back "
                               "to an older one") from None
