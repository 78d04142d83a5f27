"""`manifest.json`: what an engine is, and a fingerprint over every file in it.

The layout and the graphs' interface are the engine contract (`spec_compiler/engine_format.py`);
the manifest records the contract's sizes (`dims`) for this engine, the configs it was built
from, each graph's artifact, weights and passes, the parallel layout, and how --tree auto chose
the tree of each batch bucket (`bucket_trees`; `tree_choice`: per bucket, the candidates with
their expected tokens per call, predicted step ms and expected tokens/s, the cost model's
timings at that batch, the choice, and with measured dispatch both compiled step times under
"measured"; null for an explicit tree; the runtime does not read it). The runtime reads
shapes, tree and graphs from here, never from flags. Loading checks, in order: schema version,
torch version, file names, and the fingerprint (sha256 of every artifact file plus the manifest
body), so an engine from another version or with an edited file fails with one clear line.
Engine files are plain names inside the engine directory (`check_file_names`): an entry that is
absolute, has `..` or a separator, or is a symlink out of the directory is refused before
anything is opened, whatever the fingerprint says (anyone can re-sign a manifest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spec_compiler import engine_format as fmt
from spec_compiler.errors import SpecCompileError
from spec_compiler.fileio import atomic_write_text, path_inside, read_json_object
from spec_compiler.hashing import digest_files


@dataclass
class Manifest:
    data: dict

    @classmethod
    def new(cls, cfg, dims: fmt.Dims, graphs: dict) -> "Manifest":
        from spec_compiler import __version__

        return cls({
            "schema_version": fmt.SCHEMA_VERSION,
            "spec_compiler_version": __version__,
            "torch_version": torch.__version__,
            "model": cfg.model.to_json(),
            "draft": cfg.draft.to_json() if cfg.draft else None,
            "tree": cfg.tree.to_json(),  # the deepest bucket's (every bucket's unless per bucket)
            # The tree of each bucket (engine_format: per-bucket trees), by batch.
            "bucket_trees": {str(b): t.to_json() for b, t in zip(fmt.buckets(dims.batch), cfg.trees())},
            "dims": dims.to_json(),
            "dtype": cfg.dtype, "device": cfg.device, "backend": cfg.backend,
            # tensor-parallel ranks; at tp > 1 `dims` are one rank's (its kv heads) and each rank
            # has its own weights file (engine_format.weights_file); lm_head: replicated or
            # sharded by vocabulary (an all-gather of the logits)
            "parallel": {"tp": cfg.tp, "lm_head": cfg.tp_lm_head},
            "state": [t.to_json() for t in fmt.state(dims)],  # for readers; the runtime derives it
            "buckets": list(fmt.buckets(dims.batch)),  # batch buckets of the step graphs
            "graphs": graphs,  # name -> artifact at its smallest batch; larger buckets under "buckets"
            "tree_choice": None,  # set by the pipeline when --tree auto chose among candidates
        })


def fingerprint(engine_dir: Path, body: dict) -> tuple[str, dict]:
    paths = [p for p in sorted(engine_dir.rglob("*")) if p.is_file() and p.name != fmt.MANIFEST]
    files = {str(p.relative_to(engine_dir)): d for p, d in digest_files(paths).items()}
    h = hashlib.sha256(json.dumps({"body": body, "files": files}, sort_keys=True).encode())
    return h.hexdigest(), files


def write_manifest(engine_dir: Path, m: Manifest) -> None:
    body = {k: v for k, v in m.data.items() if k not in ("fingerprint", "files")}
    fp, files = fingerprint(engine_dir, body)
    atomic_write_text(engine_dir / fmt.MANIFEST,
                      json.dumps({**body, "files": files, "fingerprint": fp}, indent=1))


def read_manifest(engine_dir: Path) -> dict:
    engine_dir = Path(engine_dir)
    path = engine_dir / fmt.MANIFEST
    if not path.is_file():
        raise SpecCompileError(f"{engine_dir}: no {fmt.MANIFEST}; not an engine directory (build one "
                               "with spec-compile)")
    data = read_json_object(path, "engine", fix="rebuild the engine with spec-compile")
    if data.get("schema_version") != fmt.SCHEMA_VERSION:
        raise SpecCompileError(f"{engine_dir}: engine schema version {data.get('schema_version')!r}, "
                               f"this runtime reads version {fmt.SCHEMA_VERSION}; rebuild the engine "
                               "with this spec-compile")
    if data.get("torch_version") != torch.__version__:
        raise SpecCompileError(f"{engine_dir}: built with torch {data.get('torch_version')}, running "
                               f"torch {torch.__version__}; rebuild the engine with this torch")
    check_file_names(engine_dir, data)
    body = {k: v for k, v in data.items() if k not in ("fingerprint", "files")}
    fp, files = fingerprint(engine_dir, body)
    if fp != data.get("fingerprint"):
        recorded = data.get("files", {})
        changed = sorted(set(files) ^ set(recorded) | {f for f in files if recorded.get(f) != files[f]})
        what = ", ".join(changed[:3]) if changed else fmt.MANIFEST
        raise SpecCompileError(f"{engine_dir}: fingerprint mismatch ({what} changed since the "
                               "engine was built); rebuild the engine with spec-compile")
    return data


def check_file_names(engine_dir: Path, data: dict) -> None:
    """Each graph's `file` is a plain name, each fingerprinted `files` entry a relative path
    (`tokenizer/...`), and they, the weights and the tokenizer directory resolve inside
    `engine_dir` (no symlink out: spec-compile writes none)."""
    graphs, files = data.get("graphs"), data.get("files", {})
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        raise SpecCompileError(f"{engine_dir / fmt.MANIFEST}: corrupt (graphs is not an object of "
                               "objects); rebuild the engine with spec-compile")
    entries = [(f"graph {g!r} file", e.get("file"), True) for g, e in graphs.items()]
    for g, e in graphs.items():
        more = e.get("buckets", {})
        if not isinstance(more, dict) or not all(isinstance(b, dict) for b in more.values()):
            raise SpecCompileError(f"{engine_dir / fmt.MANIFEST}: corrupt (graph {g!r} buckets is not "
                                   "an object of objects); rebuild the engine with spec-compile")
        entries += [(f"graph {g!r} bucket {b} file", be.get("file"), True) for b, be in more.items()]
    entries += [("files entry", f, False) for f in (files if isinstance(files, dict) else [files])]
    tp = data.get("parallel", {}).get("tp", 1) if isinstance(data.get("parallel"), dict) else 1
    # each rank's weights (a corrupt tp is refused by the loader, which reads it next)
    weights = [fmt.weights_file(r, tp) for r in range(tp)] if type(tp) is int and 0 < tp <= 4096 else []
    entries += [("file", w, True) for w in weights] + [("directory", fmt.TOKENIZER_DIR, True)]
    for what, name, plain in entries:
        if path_inside(engine_dir, name, plain=plain, links=False) is None:
            raise SpecCompileError(f"{engine_dir / fmt.MANIFEST}: {what} {name!r} is not a "
                                   f"{'plain file name' if plain else 'relative path'} inside "
                                   f"{engine_dir} (absolute, '..', a separator or a link out); "
                                   "rebuild the engine with spec-compile")
