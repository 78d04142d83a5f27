"""How records name files: sha256 (engine fingerprints, training records) and a portable path."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 << 20  # bytes per leaf of the engine files' two-level hash

# The folder that holds the spec_compiler package: the repository in a source checkout
# (site-packages in a plain install, where the packaged prompt files still get a stable name).
ROOT = Path(os.path.abspath(Path(__file__).parent.parent))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """One sha256 over a checkpoint's safetensors files (names and contents, in name order):
    what training records and checks as "the same target"."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def digest_files(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    """Each file's "sha256x64m:" digest: sha256 over the sha256 digests of its 64 MiB chunks,
    in order (a two-level hash, as secure as sha256 of the file for detecting any edit). The
    chunks of all files are hashed in parallel threads (hashlib releases the GIL), so an
    engine's 16 GB of weights hash at the speed of every core, not one core's ~1-2 GB/s; this
    is what loading an engine pays to check it."""
    jobs = [(p, off) for p in paths for off in range(0, max(os.path.getsize(p), 1), CHUNK)]

    def leaf(job):
        path, off = job
        fd = os.open(path, os.O_RDONLY)
        try:
            return hashlib.sha256(os.pread(fd, CHUNK, off)).digest()
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1)) as pool:
        leaves = list(pool.map(leaf, jobs))
    out: dict[Path, hashlib._Hash] = {p: hashlib.sha256() for p in paths}
    for (p, _), d in zip(jobs, leaves):
        out[p].update(d)
    return {p: "sha256x64m:" + h.hexdigest() for p, h in out.items()}


def record_path(path: str | Path) -> str:
    """`path` as a record (training.json) names it: relative to the repository when it lies
    inside, else its name alone (the sha256 recorded beside it says which file it was); never an
    absolute path of the machine it ran on."""
    path = Path(path)
    for p, root in ((Path(os.path.abspath(path)), ROOT), (path.resolve(), ROOT.resolve())):
        if p.is_relative_to(root):
            return p.relative_to(root).as_posix()
    return Path(os.path.abspath(path)).name
