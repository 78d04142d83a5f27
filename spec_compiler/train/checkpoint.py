"""Resumable training checkpoints: `CKPT_DIR/step-NNNNNNN.pt`, written atomically.

One checkpoint holds everything to continue bit-for-bit where the run stopped: the draft's
trained parameters (float32), the optimizer state, the noise RNG state, the counters (step,
tokens, generation-batch index, pass and minibatch cursor), the settings that shape training,
the current generation batch itself (tokens; a resume recomputes the features), and with a
validation split the best weights so far. Prompt order and per-batch shuffles are pure functions
of (seed, index): they need no state.

A checkpoint larger than `part_bytes` travels in parts, so each file fits a size limit (a
machine that returns files of at most 16 MiB): `step-N.pt.part000`, `...part001`, ... and the
manifest `step-N.pt.parts` (JSON: each part's size and sha256, and the whole's), written last.
Every file is written atomically (`fileio.atomic_open`: a temporary beside it, fsync'd, then
renamed), and the manifest is the commit point: an interrupted save leaves the older checkpoints
as they were. A checkpoint that fits is one `step-N.pt`, as before. The newest `keep` are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import torch

from ..errors import SpecCompileError, brief
from ..fileio import atomic_write_bytes, atomic_write_text, read_json_object, read_recorded

_NAME = re.compile(r"^step-(\d+)\.pt(\.parts)?$")
_PART = re.compile(r"^step-(\d+)\.pt\.part\d+$")
MANIFEST_FORMAT = "spec-train-checkpoint-parts/1"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `step-N.pt` files and `step-N.pt.parts` manifests."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name, p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for *_, p in sorted(found)]


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int = 2,
                    part_bytes: int | None = None) -> Path:
    """Write step `step`'s checkpoint (in parts of at most `part_bytes` when larger) and prune
    all but the newest `keep`; returns the checkpoint file or the manifest."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    single = ckpt_dir / f"step-{step:07d}.pt"
    manifest = ckpt_dir / f"{single.name}.parts"
    manifest.unlink(missing_ok=True)  # a rewrite of this step: the old one is no longer whole
    if part_bytes is None or len(data) <= part_bytes:
        atomic_write_bytes(single, data)
        path = single
    else:
        single.unlink(missing_ok=True)
        parts = []
        for k, off in enumerate(range(0, len(data), part_bytes)):
            chunk = data[off:off + part_bytes]
            name = f"{single.name}.part{k:03d}"
            atomic_write_bytes(ckpt_dir / name, chunk)
            parts.append({"file": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
        atomic_write_text(manifest, json.dumps({
            "format": MANIFEST_FORMAT, "step": step, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}, indent=1) + "\n")
        path = manifest
    del data
    found = list_checkpoints(ckpt_dir)
    for old in found[:-keep]:
        old.unlink()  # a manifest first: its parts are then orphans, removed below
    kept = {(_step(p), p.name.endswith(".parts")) for p in found[-keep:]}
    for p in ckpt_dir.iterdir():  # parts of pruned or unfinished split checkpoints
        if (m := _PART.match(p.name)) and (int(m.group(1)), True) not in kept:
            p.unlink()
    return path


def load_latest(ckpt_dir: Path) -> tuple[Path, dict]:
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise SpecCompileError(f"--resume: no checkpoint (step-N.pt) in {ckpt_dir}; start without "
                               "--resume, or pass the run's --checkpoint-dir")
    path = found[-1]
    raw = _read_parts(path) if path.name.endswith(".parts") else path
    try:
        return path, torch.load(io.BytesIO(raw) if isinstance(raw, bytes) else raw, map_location="cpu",
                                weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise SpecCompileError(f"--resume: cannot read {path} ({brief(e)}); delete it to fall back "
                               "to an older one") from None


def _read_parts(manifest: Path) -> bytes:
    """A split checkpoint's bytes, every part and the whole checked against the manifest."""
    fix = f"restore it, or delete {manifest.name} to fall back to an older checkpoint"
    m = read_json_object(manifest, "--resume", fix=fix)
    parts = m.get("parts")
    if m.get("format") != MANIFEST_FORMAT or not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("file"), str) and _PART.match(p["file"])
            and isinstance(p.get("bytes"), int) and isinstance(p.get("sha256"), str) for p in parts):
        raise SpecCompileError(f"--resume: {manifest} is not a checkpoint manifest; {fix}")
    out = bytearray()
    for p in parts:
        out += read_recorded(manifest.parent / p["file"], p["bytes"], p["sha256"], "--resume",
                             "checkpoint part", manifest.name, fix)
    if hashlib.sha256(out).hexdigest() != m.get("sha256"):
        raise SpecCompileError(f"--resume: {manifest} does not match its parts; {fix}")
    return bytes(out)
