"""Loading AOTInductor packages.

Some images ship a Python whose process-wide libstdc++ clashes with the copies of libstdc++
symbols that an AOTInductor `wrapper.so` carries (a segfault in std::regex during
`parse_device_str`). Loading the system libstdc++ globally *before* the package, once, makes
the dynamic linker bind those symbols to one library; users set nothing by hand.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger("spec_compiler.runtime")


@functools.cache
def _preload_system_libstdcxx() -> str | None:
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        return None
    try:
        path = subprocess.run([gxx, "-print-file-name=libstdc++.so.6"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:  # optional probe
        log.info("no system libstdc++ found (%s)", e)
        return None
    if not path or not Path(path).is_file():
        return None
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def load_package(path: Path, device: str):
    """Load an AOTInductor package. On CUDA, single-threaded runners (no per-call CUDA events),
    so a call can be captured in a CUDA graph (runtime/cuda_graph.py)."""
    cuda = device.startswith("cuda")
    if cuda:
        _preload_system_libstdcxx()
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=cuda)
