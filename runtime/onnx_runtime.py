"""Running an onnx engine's graphs with ONNX Runtime, behind the same call as an AOTInductor runner.

An ONNX graph (export/onnx_export.py) takes the caches as inputs and returns, besides the
contract's outputs, the rows it writes and their cache slots (`return_cache_rows`); the runner
writes those rows into the cache tensors it was called with (views of the engine state), on the
state's device, right after the call. So the state stays the runtime's torch tensors, as with
Inductor, and a step moves only the new rows, never a whole cache.
Nothing is copied in or out of ONNX Runtime: every input (the state views; prefill's weights
from the shared weights.safetensors) and every output is bound by its memory address (I/O
binding). Input bindings persist between calls and are redone only for a tensor that changed.
On the CPU the decode graphs (PREPACKED) get their weights as session constants instead, over
the same memory, so ONNX Runtime prepacks their matmul operands once (`_weights_as_initializers`;
each such session keeps a packed copy, so only where the copies fit: `prepack_fits`).
The execution provider follows the engine's device: CPUExecutionProvider, or
CUDAExecutionProvider when the engine is a CUDA one (that needs an onnxruntime build with it).
"""

from __future__ import annotations

import os
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


_NUMPY_WEIGHTS = (torch.float32, torch.float16)  # weight dtypes numpy can view (not bfloat16)
# The graphs whose weights are given to ONNX Runtime as constants, to be prepacked
# (`_weights_as_initializers`): the decode step's, where a token's matmuls are the time.
PREPACKED = frozenset({"verify", "verify_sampled", "draft"})


def _weights_as_initializers(path: Path, weights: list[torch.Tensor], opts) -> tuple[bytes, tuple]:
    """The graph with its weight inputs (the first len(weights)) turned into initializers whose
    memory is the runtime's own weight tensors (`add_external_initializers` over numpy views of
    them: the engine's one copy, shared by every graph). Why: ONNX Runtime prepacks a constant matrix operand of MatMul/Gemm
    into its kernels' blocked layout once, at session start, and a graph input is never constant.
    Prepacked, SmolLM2's decode matmuls ran about 1.5-2x faster on the CPU; the price is the packed
    copy each session keeps (about the size of the weights its matmuls read). Returns the model
    bytes and what must outlive the session: (the original graph inputs, the numpy views, the
    OrtValues)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    inputs = list(model.graph.input)
    consts = inputs[:len(weights)]
    del model.graph.input[:]
    model.graph.input.extend(inputs[len(weights):])
    arrays, values = [], []
    for vi, t in zip(consts, weights):
        a = t.detach().contiguous().numpy()
        dims = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        if dims != a.shape:
            raise SpecCompileError(f"{path}: input {vi.name} has shape {dims}, its weight {tuple(a.shape)}; "
                                   "the engine is corrupt; rebuild it with spec-compile")
        init = onnx.TensorProto(name=vi.name, data_type=vi.type.tensor_type.elem_type, dims=a.shape,
                                data_location=onnx.TensorProto.EXTERNAL)
        entry = init.external_data.add()  # the data comes from add_external_initializers
        entry.key, entry.value = "location", "weights.safetensors"
        model.graph.initializer.append(init)
        arrays.append(a)
        values.append(ort.OrtValue.ortvalue_from_numpy(a))
    opts.add_external_initializers([vi.name for vi in consts], values)
    return model.SerializeToString(), (inputs, arrays, values)


def write_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """rows (B, H, T, Dh) into cache (B, H, S, Dh) at slots (B, T), in place."""
    cache.scatter_(2, slots[:, None, :, None].expand(rows.shape), rows)


def prepack_fits(weight_bytes: int, sessions: int) -> bool:
    """Whether `sessions` packed copies of `weight_bytes` (one per PREPACKED graph and batch
    bucket, if every one is called) fit in a quarter of the machine's memory (SmolLM2 in float32
    at one bucket: 3 x 0.54 GB; an 8B model in float32 would not)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return weight_bytes * sessions <= phys // 4


class OnnxRunner:
    """One .onnx graph as a flat function: tensors in (the graph's inputs in order), the
    contract's outputs out; the cache rows it returns are written into its cache inputs.

    With `weights` (CPU only), they are the session's constants, prepacked
    (`_weights_as_initializers`), and that session starts at the first call: the engine loads as
    fast as without, and a graph never called (verify_sampled in a greedy-only process) costs
    no packed copy."""

    def __init__(self, path: Path, device: str, cache_writes: list[list[str]],
                 weights: list[torch.Tensor] | None = None):
        ort = import_onnxruntime(f"the onnx engine {path.parent}")
        cuda = device.startswith("cuda")
        provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise SpecCompileError(f"{path.parent} is a CUDA engine and this onnxruntime has no "
                                   "CUDAExecutionProvider; install onnxruntime-gpu, or rebuild the "
                                   "engine with --device cpu")
        index = torch.device(device).index or 0
        self.device = ("cuda", index) if cuda else ("cpu", 0)
        self.path, self.provider, self.cache_writes = path, provider, cache_writes
        self.weights = weights if weights and not cuda and all(
            t.dtype in _NUMPY_WEIGHTS for t in weights) else None
        self.session = None
        if self.weights is None:
            self._start()

    def _start(self) -> None:
        ort = import_onnxruntime(f"the onnx engine {self.path.parent}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # as many as torch's CPU ops use
        # No spin-waiting between calls: the host loop's torch ops run on the same cores between
        # graph calls, and spinning pool threads took them (SmolLM2 on a loaded 2-core CPU: about
        # 2x the tokens/s without spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.constant: set[int] = set()  # input positions given to the session as initializers
        if self.weights is not None:
            model, self._keep = _weights_as_initializers(self.path, self.weights, opts)
            self.session = ort.InferenceSession(model, opts, providers=[self.provider])
            self.inputs = [i.name for i in self._keep[0]]
            self.constant = set(range(len(self.weights)))
        else:
            self.session = ort.InferenceSession(str(self.path), opts, providers=[self.provider])
            self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, tuple(o.shape), _DTYPES[o.type]) for o in self.session.get_outputs()]
        names = [o[0] for o in self.outputs]
        self.writes = [(self.inputs.index(c), names.index(r), names.index(s))
                       for c, r, s in self.cache_writes]
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
        if self.session is None:
            self._start()
        assert len(tensors) == len(self.inputs), (len(tensors), self.inputs)
        for i, (name, t) in enumerate(zip(self.inputs, tensors)):
            if i in self.constant:  # the session holds these (prepacked); they never change
                continue
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
