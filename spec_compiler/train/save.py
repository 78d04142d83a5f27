"""Writing a trained draft head: the EAGLE-1/2 or EAGLE-3 reference format that
`spec-compile --draft` reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import SpecCompileError
from ..fileio import atomic_dir
from ..models.eagle import EagleDraft
from ..models.eagle3 import Eagle3Draft

# A draft's weights past this are written in shards: each file then fits the 16 MiB that a file
# of a draft shipped in a repository (drafts/) or returned by a GPU job may have here.
SHARD_BYTES = 15 << 20
INDEX = "model.safetensors.index.json"
# The weights files of a draft directory, in any layout a loader reads (loading.read_draft_state).
WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model\.bin")


def save_draft(draft: EagleDraft, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
               extra_config: dict | None = None, hot_ids: torch.Tensor | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write an EAGLE-1/2 reference-format head (config.json + model.safetensors), atomically.

    The directory is built beside `out_dir` and swapped in at once (`fileio.atomic_dir`, "merge"):
    an interrupted save leaves the previous head whole, and whatever else `out_dir` holds
    (checkpoints/, tree.json, ...) stays. `extra_files` (name -> text) are written in the same
    swap (training.json). `hot_ids` (1-D int64 target ids, unique, in the order wanted; default:
    the draft's own hot list, if any) adds a reduced draft vocabulary in EAGLE-3's format: `d2t`,
    `t2d` and config `draft_vocab_size`. Give them most frequent first: `--draft-vocab N` takes a
    prefix. The lm_head is never written; loading takes the target's rows of the hot ids."""
    V = draft.cfg.layer.vocab_size
    hot_ids = _checked_hot_ids(draft.hot_ids if hot_ids is None else hot_ids, V)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in draft.state_dict().items()
          if not k.startswith("lm_head.") and k != "hot_ids"
          and (draft.cfg.has_embed or not k.startswith("embed_tokens."))}
    if hot_ids is not None:
        sd.update(_hot_tables(hot_ids, V))
    c = draft.cfg.layer
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bias": draft.cfg.fc_bias,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": draft.cfg.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
           "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
           "torch_dtype": str(dtype).removeprefix("torch."), **(extra_config or {})}
    if c.rope_scaling:
        cfg["rope_scaling"] = c.rope_scaling
    if hot_ids is not None:
        cfg["draft_vocab_size"] = hot_ids.numel()
    return _write(out_dir, sd, cfg, extra_files)


def save_eagle3(draft: Eagle3Draft, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                hot_ids: torch.Tensor | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write an EAGLE-3 reference-format head, atomically as `save_draft`: `fc`, `midlayer.*`,
    `norm` and its own `lm_head` (with `hot_ids`, only their rows, in that order, and `d2t`/`t2d`),
    config.json with `draft_vocab_size`, `target_hidden_size` and the fused target layers
    (`eagle_aux_hidden_state_layer_ids`). The embedding is the target's: not written."""
    V = draft.cfg.layer.vocab_size
    lm = draft.lm_head.weight.detach()
    if draft.hot_ids is not None:  # trained over its hot vocabulary: the rows are those already
        if hot_ids is not None and not torch.equal(hot_ids.cpu(), draft.hot_ids.cpu()):
            raise ValueError("save_eagle3: hot_ids differ from the head's own hot vocabulary")
        hot_ids = draft.hot_ids.cpu()
    else:
        hot_ids = _checked_hot_ids(hot_ids, V)
        lm = lm if hot_ids is None else lm[hot_ids.to(lm.device)]
    sd = {k: v.detach().to(dtype).contiguous() for k, v in draft.state_dict().items()
          if k.startswith(("fc.", "midlayer.", "norm."))}
    sd["lm_head.weight"] = lm.to(dtype).contiguous()
    if hot_ids is not None:
        sd.update(_hot_tables(hot_ids, V))
    c = draft.cfg.layer
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "vocab_size": V,
           "draft_vocab_size": V if hot_ids is None else hot_ids.numel(),
           "target_hidden_size": draft.cfg.target_hidden_size,
           "eagle_aux_hidden_state_layer_ids": list(draft.cfg.aux_layers),
           "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
           "torch_dtype": str(dtype).removeprefix("torch.")}
    if c.rope_scaling:
        cfg["rope_scaling"] = c.rope_scaling
    return _write(out_dir, sd, cfg, extra_files)


def _checked_hot_ids(hot_ids: torch.Tensor | None, V: int) -> torch.Tensor | None:
    if hot_ids is None:
        return None
    hot_ids = hot_ids.detach().cpu()
    if hot_ids.dim() != 1 or hot_ids.numel() == 0 or hot_ids.is_floating_point() or hot_ids.dtype == torch.bool:
        raise SpecCompileError(f"save_draft: hot_ids has dtype {hot_ids.dtype} and shape "
                               f"{tuple(hot_ids.shape)}; expected non-empty 1-D int64 target ids")
    hot_ids = hot_ids.long()
    if int(hot_ids.min()) < 0 or int(hot_ids.max()) >= V or hot_ids.unique().numel() != hot_ids.numel():
        raise SpecCompileError(f"save_draft: hot_ids must be unique target ids in [0, {V})")
    return hot_ids


def _hot_tables(hot_ids: torch.Tensor, V: int) -> dict[str, torch.Tensor]:
    """EAGLE-3's tables: d2t (target id = index + d2t[index]) and t2d (True at the hot ids)."""
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[hot_ids] = True
    return {"d2t": hot_ids - torch.arange(hot_ids.numel()), "t2d": t2d}


def _write(out_dir: str | Path, sd: dict, cfg: dict, extra_files: dict[str, str] | None,
           shard_bytes: int = SHARD_BYTES) -> Path:
    """The weights as one `model.safetensors`, or, past `shard_bytes`, as Hugging Face shards
    (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`, which every loader here
    reads; a tensor larger than `shard_bytes` gets a shard of its own); the previous weights files
    of `out_dir`, in either layout, go in the same swap."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, existing="merge", carry=lambda name: not WEIGHT_FILES.fullmatch(name)) as tmp:
        split = split_torch_state_dict_into_shards(sd, max_shard_size=shard_bytes)
        for fname, names in split.filename_to_tensors.items():
            save_file({n: sd[n] for n in names}, str(tmp / fname))
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
