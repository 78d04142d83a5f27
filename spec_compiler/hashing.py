"""How records name files: sha256 (engine fingerprints, training records) and a portable path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The folder that holds the spec_compiler package: the repository in a source checkout
# (site-packages in a plain install, where the packaged prompt files still get a stable name).
ROOT = Path(os.path.abspath(Path(__file__).parent.parent))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_path(path: str | Path) -> str:
    """`path` as a record (training.json) names it: relative to the repository when it lies
    inside, else its name alone (the sha256 recorded beside it says which file it was); never an
    absolute path of the machine it ran on."""
    path = Path(path)
    for p, root in ((Path(os.path.abspath(path)), ROOT), (path.resolve(), ROOT.resolve())):
        if p.is_relative_to(root):
            return p.relative_to(root).as_posix()
    return Path(os.path.abspath(path)).name
