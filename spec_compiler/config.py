"""Frozen, self-validating configs. Config flows one way: CLI -> CompileConfig -> manifest.json.

`ModelConfig.from_hf` reads a Hugging Face Llama `config.json` (Llama 2 / 3 / 3.1 / 3.2 / 3.3,
transformers 4 and 5 layouts); `DraftConfig.from_dir` reads an EAGLE-1/2 head's `config.json`.
Both read every field through one set of typed readers (`_int`, `_num`, `_flag`, `_rope`, ...):
a value of the wrong type or out of range is one SpecCompileError naming the file, the field
and the value as written (`'48'` is not 48, `true` is not 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .engine_format import min_capacity
from .errors import SpecCompileError
from .fileio import read_json_object
from .kernels.limits import MAX_PREFILL_CHUNK  # plain constants: no triton import
from .trees import TreeSpec, check_tree_nodes

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
MAX_DIM = 2**31 - 1  # any size or count in a config (kernels index with int32)
_REQUIRED = object()


def _get(cfg: dict, key: str, where: str, default):
    """cfg[key]; null counts as absent (HF writes `"head_dim": null`)."""
    v = cfg.get(key)
    if v is None:
        if default is _REQUIRED:
            raise SpecCompileError(f"{where}{key} is missing (a required field)")
        return default
    return v


def _int(cfg: dict, key: str, where: str, default=_REQUIRED) -> int | None:
    """An integer field (not a boolean, not a float) in [1, MAX_DIM]; `where`: 'FILE: '."""
    v = _get(cfg, key, where, default)
    if v is None:  # an optional field without a default
        return None
    if type(v) is not int or not 1 <= v <= MAX_DIM:
        raise SpecCompileError(f"{where}{key}={v!r} must be an integer in [1, {MAX_DIM}]")
    return v


def _num(cfg: dict, key: str, where: str, default) -> float:
    """A finite number > 0."""
    v = _get(cfg, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise SpecCompileError(f"{where}{key}={v!r} must be a finite number > 0")
    return float(v)


def _target_int(cfg: dict, key: str, where: str, want: int, default=_REQUIRED) -> int:
    """An integer field of a draft's config that must equal the target's `want`."""
    v = _int(cfg, key, where, default)
    if v != want:
        raise SpecCompileError(f"{where}{key}={v} but the target's is {want}; use a draft head "
                               "trained for this target")
    return v


def _flag(cfg: dict, key: str, where: str, default: bool) -> bool:
    v = _get(cfg, key, where, default)
    if not isinstance(v, bool):
        raise SpecCompileError(f"{where}{key}={v!r} must be true or false")
    return v


def _dict(cfg: dict, key: str, where: str) -> dict | None:
    v = cfg.get(key)
    if v is not None and not isinstance(v, dict):
        raise SpecCompileError(f"{where}{key}={v!r} must be an object (or null)")
    return v


def _eos(cfg: dict, where: str, vocab_size: int) -> tuple[int, ...]:
    """`eos_token_id`: null, a token id or a list of token ids, each in [0, vocab_size)."""
    v = cfg.get("eos_token_id")
    ids = [] if v is None else v if isinstance(v, list) else [v]
    if not all(type(t) is int and 0 <= t < vocab_size for t in ids):
        raise SpecCompileError(f"{where}eos_token_id={v!r} must be a token id or a list of token "
                               f"ids in [0, {vocab_size}) (vocab_size)")
    return tuple(ids)


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (5),
    checked: theta and factors finite and > 0, llama3's band low < high, a factor where the type
    needs one."""
    where = f"{path}: "
    params = _dict(cfg, "rope_parameters", where)
    key = "rope_parameters"
    if params is not None and "full_attention" in params:  # per-layer-type layout
        params, key = _dict(params, "full_attention", f"{where}rope_parameters."), "rope_parameters.full_attention"
    scaling = _dict(cfg, "rope_scaling", where)
    if params is not None:
        theta = _num(params, "rope_theta", f"{where}{key}.", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    else:
        theta = _num(cfg, "rope_theta", where, 10000.0)
        key = "rope_scaling"
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise SpecCompileError(f"{path}: rope scaling type {rtype!r} is not supported "
                                   f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rtype == "default":
            return theta, None
        return theta, check_rope_scaling(scaling, f"{where}{key}.")
    return theta, None


def _draft_rope(cfg: dict, path: Path, target: "ModelConfig") -> tuple[float, dict | None]:
    """A draft head's rope: its config's settings if it names any, else the target's."""
    if "rope_theta" in cfg or "rope_parameters" in cfg or "rope_scaling" in cfg:
        return _rope(cfg, path)
    return target.rope_theta, target.rope_scaling


def check_rope_scaling(scaling: dict, where: str) -> dict:
    """The scaling fields the model uses, checked, as {"rope_type", "factor", ...}."""
    rtype = scaling.get("rope_type", scaling.get("type"))
    out = {"rope_type": rtype, "factor": _num(scaling, "factor", where, _REQUIRED)}
    if rtype == "llama3":
        lo = out["low_freq_factor"] = _num(scaling, "low_freq_factor", where, 1.0)
        hi = out["high_freq_factor"] = _num(scaling, "high_freq_factor", where, 4.0)
        if not lo < hi:
            raise SpecCompileError(f"{where}low_freq_factor={lo} must be below high_freq_factor={hi}")
        out["original_max_position_embeddings"] = _int(scaling, "original_max_position_embeddings",
                                                       where, 8192)
    return out


def _made_from(path, cls, **fields):
    """cls(**fields), its own checks (across fields) reported against the file they came from."""
    try:
        return cls(**fields)
    except SpecCompileError as e:
        raise SpecCompileError(f"{path}: {str(e).removeprefix('config: ')}") from None


def _check_arch(cfg: dict, path: Path) -> None:
    arch, mtype = cfg.get("architectures"), cfg.get("model_type")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise SpecCompileError(f"{path}: architectures={arch!r} must be a list of class names such "
                               "as [\"LlamaForCausalLM\"]")
    if mtype != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise SpecCompileError(
            f"{path}: model_type={mtype!r}, architectures={arch}; only Llama "
            "(model_type 'llama', LlamaForCausalLM) checkpoints are supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise SpecCompileError(f"{path}: hidden_act={act!r}; Llama uses 'silu'")


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
        # The file readers (from_hf, DraftConfig.from_dir) check every field with its file and
        # key; this is the backstop for configs built in code.
        for f in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                  "n_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if type(v) is not int or not 0 < v <= MAX_DIM:
                raise SpecCompileError(f"config: {f}={v!r} must be a positive integer")
        for f in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise SpecCompileError(f"config: {f}={v!r} must be a finite number > 0")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, "config: rope_scaling.")
        if self.n_heads % self.n_kv_heads:
            raise SpecCompileError(f"config: num_attention_heads={self.n_heads} must be a multiple "
                                   f"of num_key_value_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise SpecCompileError(f"config: head_dim={self.head_dim} must be even (rotary "
                                   "embeddings rotate pairs)")
        if not all(type(t) is int and 0 <= t < self.vocab_size for t in self.eos_token_ids):
            raise SpecCompileError(f"config: eos_token_ids={self.eos_token_ids!r} must be token ids "
                                   f"in [0, {self.vocab_size})")

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        cfg = read_json_object(path, "model")
        _check_arch(cfg, path)
        w = f"{path}: "
        n_heads, hidden = _int(cfg, "num_attention_heads", w), _int(cfg, "hidden_size", w)
        vocab = _int(cfg, "vocab_size", w)
        theta, scaling = _rope(cfg, path)
        return _made_from(
            path, cls,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size", w),
            n_layers=_int(cfg, "num_hidden_layers", w),
            n_heads=n_heads,
            n_kv_heads=_int(cfg, "num_key_value_heads", w, n_heads),
            head_dim=_int(cfg, "head_dim", w, max(hidden // n_heads, 1)),
            rms_norm_eps=_num(cfg, "rms_norm_eps", w, 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_flag(cfg, "tie_word_embeddings", w, False),
            attention_bias=_flag(cfg, "attention_bias", w, False),
            mlp_bias=_flag(cfg, "mlp_bias", w, False),
            eos_token_ids=_eos(cfg, w, vocab),
            max_position_embeddings=_int(cfg, "max_position_embeddings", w, 2048),
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
        if v is not None and (type(v) is not int or not 0 < v <= self.layer.vocab_size):
            raise SpecCompileError(f"draft vocabulary size {v!r} must be an integer in "
                                   f"[1, {self.layer.vocab_size}] (the target's vocabulary)")

    @classmethod
    def from_dir(cls, draft_dir: str | Path, target: ModelConfig, has_embed: bool) -> "DraftConfig":
        path = Path(draft_dir) / "config.json"
        cfg = read_json_object(path, "draft")
        w = f"draft {path}: "
        hidden = _target_int(cfg, "hidden_size", w, target.hidden_size)
        _target_int(cfg, "vocab_size", w, target.vocab_size, target.vocab_size)
        n_heads = _int(cfg, "num_attention_heads", w, target.n_heads)
        theta, scaling = _draft_rope(cfg, path, target)
        layer = _made_from(
            f"draft {path}", ModelConfig,
            vocab_size=target.vocab_size,
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size", w, target.intermediate_size),
            n_layers=_int(cfg, "num_hidden_layers", w),
            n_heads=n_heads,
            n_kv_heads=_int(cfg, "num_key_value_heads", w, n_heads),
            head_dim=_int(cfg, "head_dim", w, max(hidden // n_heads, 1)),
            rms_norm_eps=_num(cfg, "rms_norm_eps", w, target.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=_flag(cfg, "attention_bias", w, False),
            eos_token_ids=target.eos_token_ids,
            max_position_embeddings=target.max_position_embeddings,
        )
        _int(cfg, "draft_vocab_size", w, None)  # type-checked here; read_hot_ids matches it to d2t
        return cls(n_layers=layer.n_layers, fc_bias=_flag(cfg, "bias", w, True),
                   has_embed=has_embed, layer=layer)

    # The target features it reads: the final hidden state (EAGLE-1/2), not fused layers.
    fused_layers: ClassVar[tuple[int, ...]] = ()

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
    batch_size: int = 1  # --max-batch: the largest batch bucket (engine_format.buckets)
    prefill_chunk: int = 64
    sampling: bool = True  # also build verify_sampled (temperature > 0)
    # One tree per batch bucket (engine_format.buckets order), chosen by `--tree auto`; None:
    # `tree` at every bucket. `tree` is then the deepest of them (what capacity checks need).
    bucket_trees: tuple[TreeSpec, ...] | None = None
    tp: int = 1  # --tp: tensor-parallel ranks (passes/tensor_parallel.py)
    tp_lm_head: str = "replicated"  # --tp-lm-head: replicated on every rank, or sharded by vocabulary
    # --tree auto's measured dispatch (pipeline.measure_dispatch): also build plain decoding
    # (chain-0 verify) at every speculating bucket, time both compiled steps and keep the faster
    plain_alternates: bool = False
    # ... and, per bucket (buckets order; None: none there), a smaller tree of the same depth whose
    # graphs are built beside the bucket's own and timed with them (pipeline.tree_alternates)
    tree_alternates: tuple[TreeSpec | None, ...] | None = None

    def trees(self) -> tuple[TreeSpec, ...]:
        """The tree of each batch bucket, smallest bucket first."""
        from .engine_format import buckets

        return self.bucket_trees or (self.tree,) * len(buckets(self.batch_size))

    def __post_init__(self):
        if self.backend not in ("inductor", "eager", "onnx"):
            raise SpecCompileError(f"--backend {self.backend!r}: expected inductor, eager or onnx")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SpecCompileError(f"--dtype {self.dtype!r}: expected float32 or bfloat16")
        if self.device not in ("cpu", "cuda"):
            raise SpecCompileError(f"--device {self.device!r}: expected cpu or cuda")
        # The CUDA tree-attention kernels' limits, enforced on every device: only CUDA engines run
        # them, but a tree or chunk size that compiles should not depend on --device. The tree
        # bound also covers the draft graph, whose calls are smaller (spec_compiler/kernels/limits.py).
        for flag, v in (("--max-seq-len", self.max_seq_len), ("--prefill-chunk", self.prefill_chunk),
                        ("--max-batch", self.batch_size)):
            if type(v) is not int:
                raise SpecCompileError(f"{flag} {v!r}: must be an integer")
        if self.batch_size < 1:
            raise SpecCompileError(f"--max-batch {self.batch_size}: must be at least 1 (the most "
                                   "sequences the engine decodes at once)")
        if not 1 <= self.prefill_chunk <= MAX_PREFILL_CHUNK:
            raise SpecCompileError(f"--prefill-chunk {self.prefill_chunk}: must be 1 to "
                                   f"{MAX_PREFILL_CHUNK} tokens (the tree-attention kernels' limit)")
        from spec_compiler.passes.tensor_parallel import check_tp

        from .engine_format import buckets

        if type(self.tp) is not int:
            raise SpecCompileError(f"--tp {self.tp!r}: must be an integer")
        check_tp(self.model, self.tp, self.tp_lm_head)
        if self.tp == 1 and self.tp_lm_head != "replicated":
            raise SpecCompileError(f"--tp-lm-head {self.tp_lm_head}: shards over tensor-parallel ranks; "
                                   "it needs --tp N with N > 1")
        if self.tp > 1 and self.backend == "onnx":
            raise SpecCompileError(f"--tp {self.tp} with --backend onnx: tensor-parallel engines are "
                                   "built with Inductor only; drop --tp or use --backend inductor")
        if self.bucket_trees is not None and len(self.bucket_trees) != len(buckets(self.batch_size)):
            raise SpecCompileError(f"{len(self.bucket_trees)} bucket trees for buckets "
                                   f"{list(buckets(self.batch_size))}; this is a compiler bug")
        for tree in self.trees():
            check_tree_nodes(tree.name, tree.n_nodes)
            need = min_capacity(self.prefill_chunk, tree.max_depth)
            if self.max_seq_len < need:
                raise SpecCompileError(
                    f"--max-seq-len {self.max_seq_len} is too small for a prefill chunk of "
                    f"{self.prefill_chunk} and one step of tree {tree.name!r} (depth "
                    f"{tree.max_depth}): use at least {need}")
            dv = self.draft.draft_vocab_size if self.draft is not None else None
            if dv is not None and tree.n_nodes > 1 and dv < tree.top_k:
                raise SpecCompileError(f"--draft-vocab {dv} is smaller than tree {tree.name!r}'s "
                                       f"top-k {tree.top_k}; use at least {tree.top_k} tokens")
            if tree.top_k > self.model.vocab_size:
                raise SpecCompileError(f"--tree: tree {tree.name!r} has rank {tree.top_k - 1} "
                                       f"(top-k {tree.top_k}), but the vocabulary has "
                                       f"{self.model.vocab_size} tokens; ranks must be below "
                                       f"{self.model.vocab_size}")
            if tree.n_nodes > 1 and self.draft is None:
                raise SpecCompileError(f"tree {tree.name!r} needs a draft: pass --draft DRAFT_DIR "
                                       "(or --tree chain-0 for plain decoding)")


def check_machine(cfg: CompileConfig) -> None:
    """Before loading anything: this machine has the device `cfg` names, and memory for the
    engine's runtime state (the KV caches of target and draft for `max_seq_len` tokens and the
    per-slot buffers: engine_format.state_bytes, what the runtime allocates) in half of the
    device's memory, leaving the other half to the weights and to the compile's example inputs
    (caches of the same size)."""
    import torch

    from . import engine_format as fmt

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SpecCompileError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is "
                               "false); use --device cpu, or compile on a machine with a GPU")
    total, where = device_memory(cfg.device)
    dims = fmt.Dims.from_config(cfg)
    need, have = fmt.state_bytes(dims), total // 2
    if need > have:
        per_token = need - fmt.state_bytes(dataclasses.replace(dims, max_seq_len=dims.max_seq_len - 1))
        fit = int(cfg.max_seq_len - (need - have) / per_token)
        least = min_capacity(cfg.prefill_chunk, cfg.tree.max_depth)
        size = f"the engine's KV caches and buffers would take {need / 2**30:.1f} GiB"
        half = f"half of the {total / 2**30:.1f} GiB of {where} (the weights and the compile need the rest)"
        if fit < least:
            m = cfg.model
            raise SpecCompileError(
                f"{size} even with the smallest --max-seq-len ({least}), more than {half}: the "
                f"model is too large for it (config.json: num_hidden_layers={m.n_layers}, "
                f"num_key_value_heads={m.n_kv_heads}, head_dim={m.head_dim})")
        raise SpecCompileError(f"--max-seq-len {cfg.max_seq_len}: {size}, more than {half}; use a "
                               f"--max-seq-len of at most about {fit}")


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or taskset's
    share, not the whole machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, description) of the memory an engine on `device` lives in."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "GPU memory (device 0)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def eagle3_default_layers(n_target_layers: int) -> tuple[int, int, int]:
    """The target layers whose inputs feed an EAGLE-3 head when its config names none: the
    reference implementation's choice, the hidden state entering layers 2, L // 2 and L - 3."""
    return 2, n_target_layers // 2, n_target_layers - 3


@dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft head: fc(concat of three target layers' hidden states, 3 x target
    hidden) -> one decoder layer whose attention reads [norm(embedding) ; norm(feature)] (2 x
    hidden) -> its own final norm and lm_head over `draft_vocab_size` tokens (d2t maps columns
    to target ids). `aux_layers`: the target layers whose input hidden states are fused, in
    layer order (the index of Hugging Face's `hidden_states` tuple: 0 is the embedding)."""

    layer: ModelConfig  # the decoder layer's shapes; head_dim = hidden // heads, as the reference
    target_hidden_size: int
    aux_layers: tuple[int, ...]
    has_embed: bool
    draft_vocab_size: int | None = None  # None: the head scores the whole vocabulary

    @classmethod
    def from_dir(cls, draft_dir: str | Path, target: ModelConfig, has_embed: bool) -> "Eagle3Config":
        path = Path(draft_dir) / "config.json"
        cfg = read_json_object(path, "draft")
        w = f"draft {path}: "
        hidden = _int(cfg, "hidden_size", w)
        n_heads = _int(cfg, "num_attention_heads", w)
        if hidden % n_heads:
            raise SpecCompileError(f"{w}hidden_size={hidden} must be a multiple of "
                                   f"num_attention_heads={n_heads} (EAGLE-3 heads use hidden / heads)")
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim != hidden // n_heads:
            raise SpecCompileError(f"{w}head_dim={head_dim!r} but the EAGLE-3 layer uses hidden_size / "
                                   f"num_attention_heads = {hidden // n_heads}; this head is not supported")
        if _int(cfg, "num_hidden_layers", w, 1) != 1:
            raise SpecCompileError(f"{w}num_hidden_layers={cfg['num_hidden_layers']!r}: an EAGLE-3 head has "
                                   "one decoder layer (midlayer)")
        _target_int(cfg, "vocab_size", w, target.vocab_size, target.vocab_size)
        t_hidden = _target_int(cfg, "target_hidden_size", w, target.hidden_size, hidden)
        if hidden != target.hidden_size and not has_embed:
            raise SpecCompileError(f"{w}hidden_size={hidden} differs from the target's "
                                   f"{target.hidden_size} and the head has no embed_tokens.weight of its own")
        aux = cfg.get("eagle_aux_hidden_state_layer_ids")
        if aux is None and isinstance(cfg.get("eagle_config"), dict):
            aux = cfg["eagle_config"].get("eagle_aux_hidden_state_layer_ids")
        L = target.n_layers
        if aux is None:
            aux = eagle3_default_layers(L)
            if len(set(aux)) != 3 or min(aux) < 0:
                raise SpecCompileError(f"{w}no eagle_aux_hidden_state_layer_ids, and the reference's "
                                       f"default layers {list(aux)} do not fit a target of {L} layers; "
                                       "name three distinct layers in the config")
        elif (not isinstance(aux, list) or len(aux) != 3 or len(set(aux)) != 3
              or not all(type(i) is int and 0 <= i < L for i in aux)):
            raise SpecCompileError(f"{w}eagle_aux_hidden_state_layer_ids={aux!r} must list three distinct "
                                   f"target layers in [0, {L})")
        theta, scaling = _draft_rope(cfg, path, target)
        layer = _made_from(
            f"draft {path}", ModelConfig, vocab_size=target.vocab_size, hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size", w), n_layers=1, n_heads=n_heads,
            n_kv_heads=_int(cfg, "num_key_value_heads", w, n_heads), head_dim=hidden // n_heads,
            rms_norm_eps=_num(cfg, "rms_norm_eps", w, target.rms_norm_eps), rope_theta=theta,
            rope_scaling=scaling, eos_token_ids=target.eos_token_ids,
            max_position_embeddings=target.max_position_embeddings)
        _int(cfg, "draft_vocab_size", w, None)  # type-checked here; read_hot_ids matches it to d2t
        return cls(layer=layer, target_hidden_size=t_hidden, aux_layers=tuple(sorted(aux)), has_embed=has_embed)

    n_layers = 1  # the midlayer

    @property
    def fused_layers(self) -> tuple[int, ...]:
        """The target layers whose input hidden states, concatenated, are the draft's features."""
        return self.aux_layers

    @classmethod
    def from_json(cls, d: dict) -> "Eagle3Config":
        return cls(ModelConfig.from_json(d["layer"]), d["target_hidden_size"], tuple(d["aux_layers"]),
                   d["has_embed"], d["draft_vocab_size"])

    def to_json(self) -> dict:
        return {"kind": "eagle3", "layer": self.layer.to_json(), "target_hidden_size": self.target_hidden_size,
                "aux_layers": list(self.aux_layers), "has_embed": self.has_embed,
                "draft_vocab_size": self.draft_vocab_size}


def draft_config_from_json(d: dict) -> DraftConfig | Eagle3Config:
    """A manifest's draft entry: EAGLE-3 (kind "eagle3") or EAGLE-1/2."""
    return Eagle3Config.from_json(d) if d.get("kind") == "eagle3" else DraftConfig.from_json(d)
