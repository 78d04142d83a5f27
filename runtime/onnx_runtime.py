"""Running an onnx engine's graphs with ONNX Runtime, behind the same call as an AOTInductor runner.

An ONNX graph (export/onnx_export.py) takes the caches as inputs and returns, besides the
contract's outputs, the rows it writes and their cache slots (`return_cache_rows`); the runner
writes those rows into the cache tensors it was called with (views of the engine state), on the
state's device, right after the call. So the state stays the runtime's torch tensors, as with
Inductor, and a step moves only the new rows, never a whole cache.
Nothing is copied in or out of ONNX Runtime: every input (the weights from the shared
weights.safetensors, the state views) and every output is bound by its memory address
(I/O binding). Input bindings persist between calls and are redone only for a tensor that
changed (the weights never do).
The execution provider follows the engine's device: CPUExecutionProvider, or
CUDAExecutionProvider when the engine is a CUDA one (that needs an onnxruntime build with it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spec_compiler.errors import SpecCompileError
from spec_compiler.export.onnx_export import ONNX_EXTRA

# ONNX Runtime's element type names -> torch dtypes (what the engine graphs use).
_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
           "tensor(int64)": torch.int64, "tensor(bool)": torch.bool}


def import_onnxruntime(what: str):
    """onnxruntime, or one line naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise SpecCompileError(f"{what} needs onnxruntime, which is not installed; install the onnx "
                               f"extra: {ONNX_EXTRA}") from None
    return onnxruntime


def write_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """rows (B, H, T, Dh) into cache (B, H, S, Dh) at slots (B, T), in place."""
    cache.scatter_(2, slots[:, None, :, None].expand(rows.shape), rows)


class OnnxRunner:
    """One .onnx graph as a flat function: tensors in (the graph's inputs in order), the
    contract's outputs out; the cache rows it returns are written into its cache inputs."""

    def __init__(self, path: Path, device: str, cache_writes: list[list[str]]):
        ort = import_onnxruntime(f"the onnx engine {path.parent}")
        cuda = device.startswith("cuda")
        provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise SpecCompileError(f"{path.parent} is a CUDA engine and this onnxruntime has no "
                                   "CUDAExecutionProvider; install onnxruntime-gpu, or rebuild the "
                                   "engine with --device cpu")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # as many as torch's CPU ops use
        # No spin-waiting between calls: the host loop's torch ops run on the same cores between
        # graph calls, and spinning pool threads took them (SmolLM2 on a loaded 2-core CPU: about
        # 2x the tokens/s without spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        index = torch.device(device).index or 0
        self.device = ("cuda", index) if cuda else ("cpu", 0)
        self.session = ort.InferenceSession(str(path), opts, providers=[provider])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, tuple(o.shape), _DTYPES[o.type]) for o in self.session.get_outputs()]
        names = [o[0] for o in self.outputs]
        self.writes = [(self.inputs.index(c), names.index(r), names.index(s)) for c, r, s in cache_writes]
        rows = {i for _, r, s in self.writes for i in (r, s)}
        self.returned = [i for i in range(len(names)) if i not in rows]
        self.binding = self.session.io_binding()
        self.bound: list[tuple | None] = [None] * len(self.inputs)

    def _bind(self, name: str, t: torch.Tensor, output: bool = False) -> None:
        import numpy as np

        np_type = np.dtype(str(t.dtype).removeprefix("torch.")) if t.dtype != torch.bool else np.bool_
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, self.device[0], self.device[1], np_type, tuple(t.shape), t.data_ptr())

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        assert len(tensors) == len(self.inputs), (len(tensors), self.inputs)
        for i, (name, t) in enumerate(zip(self.inputs, tensors)):
            assert t.is_contiguous(), f"{name}: ONNX Runtime binds contiguous memory only"
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if self.bound[i] != key:
                self._bind(name, t)
                self.bound[i] = key
        dev = torch.device(*self.device) if self.device[0] == "cuda" else torch.device("cpu")
        outs = [torch.empty(shape, dtype=dtype, device=dev) for _, shape, dtype in self.outputs]
        for (name, _, _), t in zip(self.outputs, outs):
            self._bind(name, t, output=True)
        if self.device[0] == "cuda":  # ONNX Runtime's stream reads what torch's stream wrote
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(self.binding)
        for c, r, s in self.writes:
            write_rows(tensors[c], outs[r], outs[s])
        return [outs[i] for i in self.returned]
