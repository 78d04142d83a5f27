"""`manifest.json`: what an engine is, and a fingerprint over every file in it.

The runtime reads shapes, tree and graphs from here, never from flags. Loading checks, in order:
schema version, torch version, and the fingerprint (sha256 of every artifact file plus the
manifest body), so an engine from another version or with an edited file fails with one clear line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spec_compiler.errors import SpecCompileError
from spec_compiler.hashing import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    data: dict

    @classmethod
    def new(cls, cfg, graphs: dict) -> "Manifest":
        from spec_compiler import __version__

        return cls({
            "schema_version": SCHEMA_VERSION,
            "spec_compiler_version": __version__,
            "torch_version": torch.__version__,
            "model": cfg.model.to_json(),
            "draft": cfg.draft.to_json() if cfg.draft else None,
            "tree": cfg.tree.to_json(),
            "shapes": {"batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
                       "prefill_chunk": cfg.prefill_chunk, "tree_nodes": cfg.tree.n_nodes,
                       "tree_depth": cfg.tree.max_depth, "scratch": cfg.scratch},
            "dtype": cfg.dtype, "device": cfg.device, "backend": cfg.backend,
            "graphs": graphs,
        })


def fingerprint(engine_dir: Path, body: dict) -> tuple[str, dict]:
    files = {str(p.relative_to(engine_dir)): sha256_file(p) for p in sorted(engine_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    h = hashlib.sha256(json.dumps({"body": body, "files": files}, sort_keys=True).encode())
    return h.hexdigest(), files


def write_manifest(engine_dir: Path, m: Manifest) -> None:
    body = {k: v for k, v in m.data.items() if k not in ("fingerprint", "files")}
    fp, files = fingerprint(engine_dir, body)
    (engine_dir / MANIFEST).write_text(json.dumps({**body, "files": files, "fingerprint": fp}, indent=1))


def read_manifest(engine_dir: Path) -> dict:
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise SpecCompileError(f"{engine_dir}: no {MANIFEST}; not an engine directory (build one "
                               "with spec-compile)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecCompileError(f"{path}: corrupt ({e}); rebuild the engine with spec-compile") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise SpecCompileError(f"{engine_dir}: engine schema version {data.get('schema_version')}, "
                               f"this runtime reads version {SCHEMA_VERSION}; rebuild the engine "
                               "with this spec-compile")
    if data.get("torch_version") != torch.__version__:
        raise SpecCompileError(f"{engine_dir}: built with torch {data.get('torch_version')}, running "
                               f"torch {torch.__version__}; rebuild the engine with this torch")
    body = {k: v for k, v in data.items() if k not in ("fingerprint", "files")}
    fp, files = fingerprint(engine_dir, body)
    if fp != data.get("fingerprint"):
        recorded = data.get("files", {})
        changed = sorted(set(files) ^ set(recorded) | {f for f in files if recorded.get(f) != files[f]})
        what = ", ".join(changed[:3]) if changed else MANIFEST
        raise SpecCompileError(f"{engine_dir}: fingerprint mismatch ({what} changed since the "
                               "engine was built); rebuild the engine with spec-compile")
    return data
