"""ENGINE_DIR -> Engine: validate the manifest and fingerprint, load artifacts and weights once,
allocate every state buffer. Loading compiles nothing: Inductor artifacts are AOTInductor
packages, loaded as they are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import spec_compiler.ops.tree_attention  # noqa: F401  (the op, for eager-backend programs)
from spec_compiler.export.manifest import read_manifest
from spec_compiler.config import DraftConfig, ModelConfig
from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import TreeSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.long}


@dataclass
class Graph:
    """One compiled step graph with its bound weight list and input names."""

    name: str
    fn: object
    weights: list[torch.Tensor]
    inputs: list[str]
    outputs: list[str]
    owner: str

    def __call__(self, state: dict[str, torch.Tensor], **args: torch.Tensor) -> dict[str, torch.Tensor]:
        vals = [args[n] if n in args else state[self._key(n)] for n in self.inputs]
        out = self.fn(*self.weights, *vals)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return dict(zip(self.outputs, out))

    def _key(self, name: str) -> str:
        return f"{self.owner}.{name}" if name[:2] in ("k_", "v_") else name


@dataclass
class EngineSpec:
    model: ModelConfig
    draft: DraftConfig | None
    tree: TreeSpec
    batch_size: int
    max_seq_len: int
    prefill_chunk: int
    scratch: int
    dtype: torch.dtype
    device: str
    backend: str
    manifest: dict = field(repr=False)


def _load_artifact(path: Path, backend: str, device: str):
    if backend == "eager":
        return torch.export.load(str(path)).module()
    from .aoti import load_package

    return load_package(path, device)


def load(engine_dir: str | Path, device: str | None = None):
    """Load an engine built by spec-compile. Raises SpecCompileError on any mismatch."""
    from .generate import Engine

    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise SpecCompileError(f"engine {engine_dir} does not exist; build it with spec-compile")
    m = read_manifest(engine_dir)
    device = device or m["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecCompileError(f"{engine_dir} was built for CUDA but no GPU is visible here; "
                               "rebuild with --device cpu")
    if m["device"] != device.split(":")[0]:
        raise SpecCompileError(f"{engine_dir} was built for {m['device']}, not {device}; rebuild "
                               f"with --device {device}")
    sh = m["shapes"]
    spec = EngineSpec(ModelConfig.from_json(m["model"]),
                      DraftConfig.from_json(m["draft"]) if m["draft"] else None,
                      TreeSpec.from_json(m["tree"]), sh["batch_size"], sh["max_seq_len"],
                      sh["prefill_chunk"], sh["scratch"], DTYPES[m["dtype"]], device, m["backend"], m)
    from safetensors.torch import load_file

    weights = load_file(str(engine_dir / "weights.safetensors"), device=device)
    graphs, state = {}, {}
    for name, g in m["graphs"].items():
        fn = _load_artifact(engine_dir / g["file"], m["backend"], device)
        inputs = [n for n, _, _ in g["inputs"]]
        graphs[name] = Graph(name, fn, [weights[w] for w in g["weights"]], inputs, g["outputs"], g["owner"])
        for n, shape, dt in g["inputs"]:
            key = graphs[name]._key(n)
            if key not in state:
                state[key] = torch.zeros(shape, dtype=DTYPES[dt], device=device)
    B, D1 = spec.batch_size, spec.tree.max_depth + 1
    for key, shape, dt in (("cache_len", (B,), torch.long), ("n_acc", (B,), torch.long),
                           ("acc_tokens", (B, D1), torch.long),
                           ("acc_feats", (B, D1, spec.model.hidden_size), spec.dtype)):
        state.setdefault(key, torch.zeros(shape, dtype=dt, device=device))
    tok = None
    tdir = engine_dir / "tokenizer"
    if any((tdir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        tok = tdir
    print(f"loaded {engine_dir} ({len(graphs)} graphs, backend {m['backend']})", file=sys.stderr)
    return Engine(spec, graphs, state, tok)
