"""A content-addressed cache of lowered graphs, so that a compile never lowers the same graph twice.

Inductor's own caches do not cover an ahead-of-time package (lowering a graph again costs as much
as the first time), and an engine's graphs repeat: engines of one model that differ in a few
buckets' trees share the rest, every engine of a model shares its prefill graphs, and a compile
stopped part-way (an interrupt, a time limit) starts again from the graphs it had lowered.

The key is the exported program as saved (`torch.export.save`, without its example inputs: the
weights are graph inputs, so a checkpoint's values never reach the key or the artifact) with the
two things that differ between two saves of one program taken out (the archive's serialization id
and each node's `from_node` provenance, which names graphs by their address in memory), plus
everything else that shapes the artifact: the backend, device and its kind (GPU name, compute
capability, CUDA and Triton versions; the CPU's architecture and instruction-set flags), the
tensor-parallel degree, the versions of torch and of this package, the Inductor options and any
TORCHINDUCTOR_* environment. A changed input of any kind is a miss, never a wrong hit.

Where: $SPEC_COMPILER_CACHE_DIR, else $XDG_CACHE_HOME/spec-compiler/graphs (~/.cache/...);
SPEC_COMPILER_CACHE_DIR=off turns it off. Entries are written under a temporary name and renamed,
so a reader never sees half an artifact; delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import zipfile
from pathlib import Path

import torch

ENV = "SPEC_COMPILER_CACHE_DIR"


def cache_root() -> Path | None:
    """The cache's folder, or None when it is turned off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "none") else Path(value)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spec-compiler" / "graphs"


def _strip_provenance(obj) -> None:
    if isinstance(obj, dict):
        obj.pop("from_node", None)
        for v in obj.values():
            _strip_provenance(v)
    elif isinstance(obj, list):
        for v in obj:
            _strip_provenance(v)


def program_digest(saved: bytes) -> str:
    """sha256 of a saved exported program, the same for every save of the same program: entries
    in name order without the archive's top folder (named after the file), without its
    serialization id, and JSON entries without the nodes' `from_node` provenance."""
    h = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(saved)) as z:
        for name in sorted(z.namelist(), key=lambda n: n.split("/", 1)[-1]):
            inner = name.split("/", 1)[-1]
            if inner.endswith("serialization_id"):
                continue
            body = z.read(name)
            if inner.endswith(".json"):
                try:
                    obj = json.loads(body)
                except ValueError:
                    pass
                else:
                    _strip_provenance(obj)
                    body = json.dumps(obj, sort_keys=True).encode()
            h.update(inner.encode() + b"\0" + len(body).to_bytes(8, "little") + body)
    return h.hexdigest()


def program_bytes(ep) -> bytes:
    """The program as `torch.export.save` writes it, without its example inputs (at scale they
    are gigabytes of weights, and they never change the artifact)."""
    kept, ep.example_inputs = ep.example_inputs, None
    try:
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        return buf.getvalue()
    finally:
        ep.example_inputs = kept


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor()


def environment(device: str) -> dict:
    """What besides the program shapes a lowered artifact."""
    from spec_compiler import __version__

    from .lower import INDUCTOR_CONFIGS

    env = {"spec_compiler": __version__, "torch": torch.__version__, "python": sys.version_info[:2],
           "inductor": dict(INDUCTOR_CONFIGS), "machine": platform.machine(), "cpu": _cpu_flags(),
           "environ": {k: v for k, v in sorted(os.environ.items())
                       if k.startswith(("TORCHINDUCTOR_", "AOT_INDUCTOR", "TORCH_COMPILE"))
                       and k != "TORCHINDUCTOR_CACHE_DIR"}}
    if device.startswith("cuda"):
        import triton

        idx = torch.device(device).index or 0
        env.update(gpu=torch.cuda.get_device_name(idx), capability=torch.cuda.get_device_capability(idx),
                   cuda=torch.version.cuda, triton=triton.__version__)
    return env


class GraphCache:
    """Lowered artifacts by key, in `root`. Failing to write is a miss, reported once."""

    def __init__(self, root: Path, backend: str, device: str, tp: int):
        self.root, self.warned = Path(root), False
        self.salt = json.dumps({"backend": backend, "device": device.split(":")[0], "tp": tp,
                                **environment(device)}, sort_keys=True, default=str)

    @classmethod
    def for_lowering(cls, backend: str, device: str, tp: int = 1) -> GraphCache | None:
        """The cache for this compile, or None: turned off, or a backend with nothing worth
        keeping (eager saves the program itself; an ONNX export takes seconds)."""
        root = cache_root()
        if root is None or backend != "inductor":
            return None
        return cls(root, backend, device, tp)

    def key(self, saved: bytes) -> str:
        return hashlib.sha256((program_digest(saved) + self.salt).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt2"

    def fetch(self, key: str, out: Path) -> bool:
        """Copy the artifact under `key` to `out`; False if there is none."""
        src = self._path(key)
        try:
            shutil.copyfile(src, out)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            self._warn(f"cannot read {src}: {e}")
            return False
        return True

    def store(self, key: str, artifact: Path) -> None:
        dst = self._path(key)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact, tmp)
            os.replace(tmp, dst)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._warn(f"cannot write {dst.parent}: {e}")

    def _warn(self, what: str) -> None:
        if not self.warned:
            self.warned = True
            print(f"spec-compile: graph cache: {what}; compiling without it "
                  f"(set {ENV}=off to silence this)", file=sys.stderr)
