"""Frozen, self-validating configs. Config flows one way: CLI -> CompileConfig -> manifest.json.

`ModelConfig.from_hf` reads a Hugging Face Llama `config.json` (Llama 2 / 3 / 3.1 / 3.2 / 3.3,
transformers 4 and 5 layouts); `DraftConfig.from_dir` reads an EAGLE-1/2 head's `config.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .engine_format import min_capacity
from .errors import SpecCompileError
from .fileio import read_json_object
from .kernels.limits import MAX_PREFILL_CHUNK, MAX_TREE_NODES  # plain constants: no triton import
from .trees import TreeSpec

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def _need(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise SpecCompileError(f"{path}: required field {key!r} is missing")
    return cfg[key]


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type layout
        params = params["full_attention"]
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    else:
        theta = cfg.get("rope_theta", 10000.0)
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise SpecCompileError(f"{path}: rope scaling type {rtype!r} is not supported "
                                   f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": rtype, **{k: scaling[k] for k in keep if k in scaling}}
        if rtype == "default":
            scaling = None
    return float(theta), scaling


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-architecture decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int = 2048

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                  "n_kv_heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise SpecCompileError(f"config: {f}={v!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise SpecCompileError(f"config: num_attention_heads={self.n_heads} must be a multiple "
                                   f"of num_key_value_heads={self.n_kv_heads}")

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        cfg = read_json_object(path, "model")
        arch = cfg.get("architectures") or []
        mtype = cfg.get("model_type")
        if mtype != "llama" or (arch and "LlamaForCausalLM" not in arch):
            raise SpecCompileError(
                f"{path}: model_type={mtype!r}, architectures={arch}; only Llama "
                "(model_type 'llama', LlamaForCausalLM) checkpoints are supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise SpecCompileError(f"{path}: hidden_act={cfg['hidden_act']!r}; Llama uses 'silu'")
        n_heads = _need(cfg, "num_attention_heads", path)
        hidden = _need(cfg, "hidden_size", path)
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        theta, scaling = _rope(cfg, path)
        return cls(
            vocab_size=_need(cfg, "vocab_size", path),
            hidden_size=hidden,
            intermediate_size=_need(cfg, "intermediate_size", path),
            n_layers=_need(cfg, "num_hidden_layers", path),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or hidden // n_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            eos_token_ids=eos,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


@dataclass(frozen=True)
class DraftConfig:
    """An EAGLE-1/2 draft head: fc(concat(embed, feature)) -> n_layers decoder layers.

    `draft_vocab_size` is None when the head scores the target's whole vocabulary, else the
    number of "hot" target tokens its lm_head scores (EAGLE-3 / FR-Spec reduced vocabulary)."""

    n_layers: int
    fc_bias: bool
    has_embed: bool  # the head ships its own embed_tokens (else the target's is shared)
    layer: ModelConfig  # decoder-layer shapes (hidden, heads, ...), same field names as the target
    draft_vocab_size: int | None = None

    def __post_init__(self):
        v = self.draft_vocab_size
        if v is not None and (not isinstance(v, int) or not 0 < v <= self.layer.vocab_size):
            raise SpecCompileError(f"draft vocabulary size {v!r} must be an integer in "
                                   f"[1, {self.layer.vocab_size}] (the target's vocabulary)")

    @classmethod
    def from_dir(cls, draft_dir: str | Path, target: ModelConfig, has_embed: bool) -> "DraftConfig":
        path = Path(draft_dir) / "config.json"
        cfg = read_json_object(path, "draft")
        hidden = _need(cfg, "hidden_size", path)
        if hidden != target.hidden_size:
            raise SpecCompileError(
                f"draft {path}: hidden_size={hidden} but the target's is {target.hidden_size}; "
                "use a draft head trained for this target")
        vocab = cfg.get("vocab_size", target.vocab_size)
        if vocab != target.vocab_size:
            raise SpecCompileError(
                f"draft {path}: vocab_size={vocab} but the target's is {target.vocab_size}; "
                "use a draft head trained for this target")
        n_heads = cfg.get("num_attention_heads", target.n_heads)
        theta, scaling = _rope(cfg, path) if ("rope_theta" in cfg or "rope_parameters" in cfg
                                              or "rope_scaling" in cfg) else (target.rope_theta,
                                                                              target.rope_scaling)
        layer = ModelConfig(
            vocab_size=target.vocab_size,
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", target.intermediate_size),
            n_layers=_need(cfg, "num_hidden_layers", path),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or hidden // n_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", target.rms_norm_eps)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(cfg.get("attention_bias", False)),
            eos_token_ids=target.eos_token_ids,
            max_position_embeddings=target.max_position_embeddings,
        )
        return cls(n_layers=layer.n_layers, fc_bias=bool(cfg.get("bias", True)),
                   has_embed=has_embed, layer=layer)

    def to_json(self) -> dict:
        return {"n_layers": self.n_layers, "fc_bias": self.fc_bias, "has_embed": self.has_embed,
                "layer": self.layer.to_json(), "draft_vocab_size": self.draft_vocab_size}

    @classmethod
    def from_json(cls, d: dict) -> "DraftConfig":
        # Manifests written before reduced vocabularies have no draft_vocab_size: full.
        return cls(d["n_layers"], d["fc_bias"], d["has_embed"], ModelConfig.from_json(d["layer"]),
                   d.get("draft_vocab_size"))


@dataclass(frozen=True)
class CompileConfig:
    """Everything a compile needs; serialised into the engine manifest."""

    model: ModelConfig
    draft: DraftConfig | None
    tree: TreeSpec
    max_seq_len: int = 2048
    backend: str = "inductor"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 1
    prefill_chunk: int = 64

    def __post_init__(self):
        if self.backend not in ("inductor", "eager"):
            raise SpecCompileError(f"--backend {self.backend!r}: expected inductor or eager")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SpecCompileError(f"--dtype {self.dtype!r}: expected float32 or bfloat16")
        if self.device not in ("cpu", "cuda"):
            raise SpecCompileError(f"--device {self.device!r}: expected cpu or cuda")
        # The CUDA tree-attention kernels' limits, enforced on every device: only CUDA engines run
        # them, but a tree or chunk size that compiles should not depend on --device. The tree
        # bound also covers the draft graph, whose calls are smaller (spec_compiler/kernels/limits.py).
        if not 1 <= self.prefill_chunk <= MAX_PREFILL_CHUNK:
            raise SpecCompileError(f"--prefill-chunk {self.prefill_chunk}: must be 1 to "
                                   f"{MAX_PREFILL_CHUNK} tokens (the tree-attention kernels' limit)")
        if self.tree.n_nodes > MAX_TREE_NODES:
            raise SpecCompileError(
                f"--tree: tree {self.tree.name!r} has {self.tree.n_nodes} nodes, but the "
                f"tree-attention kernels handle at most {MAX_TREE_NODES} (with the root); use a "
                f"smaller tree (spec-fit-tree --nodes {MAX_TREE_NODES} or fewer)")
        need = min_capacity(self.prefill_chunk, self.tree.max_depth)
        if self.max_seq_len < need:
            raise SpecCompileError(
                f"--max-seq-len {self.max_seq_len} is too small for a prefill chunk of "
                f"{self.prefill_chunk} and one step of tree {self.tree.name!r} (depth "
                f"{self.tree.max_depth}): use at least {need}")
        dv = self.draft.draft_vocab_size if self.draft is not None else None
        if dv is not None and self.tree.n_nodes > 1 and dv < self.tree.top_k:
            raise SpecCompileError(f"--draft-vocab {dv} is smaller than tree {self.tree.name!r}'s "
                                   f"top-k {self.tree.top_k}; use at least {self.tree.top_k} tokens")
        if self.tree.n_nodes > 1 and self.draft is None:
            raise SpecCompileError(f"tree {self.tree.name!r} needs a draft: pass --draft DRAFT_DIR "
                                   "(or --tree chain-0 for plain decoding)")

