"""Checkpoint directories -> eager modules (meta init, then `load_state_dict(assign=True)`).

Target: a Hugging Face Llama directory (`config.json` + `model.safetensors`, or sharded
safetensors with `model.safetensors.index.json`). Draft: an EAGLE-1/2 head directory
(`config.json` + `model.safetensors` or `pytorch_model.bin`, the latter read with
`weights_only=True`). Names map literally: HF's `model.` prefix is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import DraftConfig, ModelConfig
from .errors import SpecCompileError
from .models.eagle import EagleDraft
from .models.llama import Llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SpecCompileError(f"{path}: cannot read safetensors ({e}); the file is corrupt or "
                               "truncated, re-download it") from None


def read_target_state(model_dir: Path) -> dict[str, torch.Tensor]:
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise SpecCompileError(f"{index}: not a valid safetensors index ({e})") from None
        state = {}
        for f in files:
            if not (model_dir / f).is_file():
                raise SpecCompileError(f"{index} lists shard {f}, which is missing from {model_dir}")
            state.update(_load_safetensors(model_dir / f))
        return state
    raise SpecCompileError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; "
                           "point at a Hugging Face checkpoint saved with safetensors")


def read_draft_state(draft_dir: Path) -> dict[str, torch.Tensor]:
    st, pt = draft_dir / "model.safetensors", draft_dir / "pytorch_model.bin"
    if st.is_file():
        return _load_safetensors(st)
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise SpecCompileError(f"{pt}: cannot load ({type(e).__name__}: {str(e)[:120]}); the "
                                   "file is corrupt or not a plain state dict") from None
    raise SpecCompileError(f"draft {draft_dir}: no model.safetensors or pytorch_model.bin; point "
                           "--draft at an EAGLE head directory")


def _assign(module: torch.nn.Module, state: dict, where: Path, dtype: torch.dtype):
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise SpecCompileError(f"{where}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                               f" ({len(missing)} in all); the checkpoint does not match its config.json")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise SpecCompileError(f"{where}: weight {k} has shape {tuple(state[k].shape)}, "
                                   f"config.json implies {tuple(v.shape)}")
    module.load_state_dict({k: state[k].to(dtype) for k in expected}, assign=True, strict=True)


def _finish(module: torch.nn.Module, buffers_from: torch.nn.Module):
    # Non-persistent buffers (rope inv_freq) are not in the state dict: rebuild them off meta.
    for name, buf in buffers_from.named_buffers():
        parent, _, leaf = name.rpartition(".")
        (module.get_submodule(parent) if parent else module)._buffers[leaf] = buf


def load_target(model_dir: str | Path, dtype: str = "float32") -> Llama:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_hf(model_dir)
    state = {k.removeprefix("model."): v for k, v in read_target_state(model_dir).items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
        if state["lm_head.weight"] is None:
            state.pop("lm_head.weight")
    with torch.device("meta"):
        model = Llama(cfg)
    _assign(model, state, model_dir, DTYPES[dtype])
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _finish(model, _buffers(cfg))
    return model.eval()


def _buffers(cfg: ModelConfig) -> torch.nn.Module:
    from .config import rope_inv_freq

    m = torch.nn.Module()
    m.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
    return m


def load_draft(draft_dir: str | Path, target: Llama, dtype: str = "float32") -> EagleDraft:
    """Load an EAGLE head; the target's embedding (unless the head has one) and lm_head are shared."""
    draft_dir = Path(draft_dir)
    state = read_draft_state(draft_dir)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecCompileError(f"draft {draft_dir}: the weights file is not a flat state dict")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "fc.weight" not in state:
        raise SpecCompileError(f"draft {draft_dir}: no fc.weight; not an EAGLE-1/2 head "
                               "(expected fc.weight [h, 2h] and layers.N.*)")
    cfg = DraftConfig.from_dir(draft_dir, target.cfg, has_embed="embed_tokens.weight" in state)
    fc = state["fc.weight"]
    if tuple(fc.shape) != (cfg.layer.hidden_size, 2 * cfg.layer.hidden_size):
        raise SpecCompileError(f"draft {draft_dir}: fc.weight has shape {tuple(fc.shape)}, expected "
                               f"{(cfg.layer.hidden_size, 2 * cfg.layer.hidden_size)} for the target's "
                               "hidden size; use a draft trained for this target")
    if cfg.has_embed and tuple(state["embed_tokens.weight"].shape) != tuple(target.embed_tokens.weight.shape):
        raise SpecCompileError(f"draft {draft_dir}: embed_tokens.weight has shape "
                               f"{tuple(state['embed_tokens.weight'].shape)}, the target's is "
                               f"{tuple(target.embed_tokens.weight.shape)}")
    cfg = DraftConfig(cfg.n_layers, "fc.bias" in state, cfg.has_embed, cfg.layer)
    state.setdefault("embed_tokens.weight", target.embed_tokens.weight)
    state["lm_head.weight"] = target.lm_head.weight
    with torch.device("meta"):
        draft = EagleDraft(cfg, target.cfg)
    _assign(draft, state, draft_dir, DTYPES[dtype])
    if not cfg.has_embed:
        draft.embed_tokens.weight = target.embed_tokens.weight
    draft.lm_head.weight = target.lm_head.weight
    _finish(draft, _buffers(cfg.layer))
    return draft.eval()


def save_draft(draft: EagleDraft, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
               extra_config: dict | None = None) -> Path:
    """Write an EAGLE-1/2 reference-format head (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in draft.state_dict().items()
          if not k.startswith("lm_head.") and (draft.cfg.has_embed or not k.startswith("embed_tokens."))}
    save_file(sd, str(out_dir / "model.safetensors"))
    c = draft.cfg.layer
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bias": draft.cfg.fc_bias,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": draft.cfg.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
           "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
           "torch_dtype": str(dtype).removeprefix("torch."), **(extra_config or {})}
    if c.rope_scaling:
        cfg["rope_scaling"] = c.rope_scaling
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir
