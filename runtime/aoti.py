"""Loading AOTInductor packages: no compiler, no subprocess, nothing but dlopen.

`torch._inductor.aoti_load_package` (torch 2.11-2.13) goes through `load_pt2` -> `_load_aoti`,
which calls `codecache.get_device_information()` only to log a warning when the package was
built on a different machine. That call runs Inductor's CPU vector-ISA probe
(`cpu_vec_isa.pick_vec_isa` -> `VecISA.check_build`): it finds a C++ compiler (`g++ --version`),
compiles test programs and dlopens each in a fresh Python process (tens of seconds in a fresh
process, on a CUDA engine too). We build the same runner `_load_aoti` returns, minus that
advisory check: `AOTIModelPackageLoader` on the package's model ("model"). Engine compatibility
is checked by the manifest instead (torch version, device).

Some images ship a Python whose process-wide libstdc++ clashes with the copies of libstdc++
symbols that an AOTInductor `wrapper.so` carries (a segfault in std::regex during
`parse_device_str`). Loading the system libstdc++ globally *before* the package, once, makes
the dynamic linker bind those symbols to one library; users set nothing by hand.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger("spec_compiler.runtime")

MODEL_NAME = "model"  # aoti_compile_and_package's default model name inside the archive


@functools.cache
def _preload_system_libstdcxx() -> str | None:
    """dlopen the C++ runtime by its soname with RTLD_GLOBAL (the dynamic linker's own search:
    no compiler is asked where it lives, no process is started)."""
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError as e:  # not a glibc system: nothing to unify
        log.info("no system libstdc++ to preload (%s)", e)
        return None
    return "libstdc++.so.6"


class Runner:
    """A loaded package as a flat function: tensors in, list of tensors out. (What
    `AOTICompiledModel` wraps, without its per-call pytree round trip: engine graphs take and
    return flat tensor lists, engine_format.graph_io.) Importing torch._inductor for that
    wrapper alone would cost about a second of every load."""

    def __init__(self, loader):
        self.loader = loader

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return self.loader.boxed_run(list(tensors))


def load_package(path: Path, device: str) -> Runner:
    """Load an AOTInductor package. On CUDA, single-threaded runners (no per-call CUDA events),
    so a call can be captured in a CUDA graph (runtime/cuda_graph.py)."""
    cuda = device.startswith("cuda")
    if cuda:
        _preload_system_libstdcxx()
    index = torch.device(device).index
    return Runner(torch._C._aoti.AOTIModelPackageLoader(  # type: ignore[attr-defined]
        str(path), MODEL_NAME, cuda, 1, -1 if index is None else index))
