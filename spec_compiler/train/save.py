"""Writing a trained draft head: the EAGLE-1/2 reference format that `spec-compile --draft` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SpecCompileError
from ..fileio import atomic_dir
from ..models.eagle import EagleDraft


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
    from safetensors.torch import save_file

    V = draft.cfg.layer.vocab_size
    if hot_ids is None:
        hot_ids = draft.hot_ids
    if hot_ids is not None:
        hot_ids = hot_ids.detach().cpu()
        if hot_ids.dim() != 1 or hot_ids.numel() == 0 or hot_ids.is_floating_point() or hot_ids.dtype == torch.bool:
            raise SpecCompileError(f"save_draft: hot_ids has dtype {hot_ids.dtype} and shape "
                                   f"{tuple(hot_ids.shape)}; expected non-empty 1-D int64 target ids")
        hot_ids = hot_ids.long()
        if int(hot_ids.min()) < 0 or int(hot_ids.max()) >= V or hot_ids.unique().numel() != hot_ids.numel():
            raise SpecCompileError(f"save_draft: hot_ids must be unique target ids in [0, {V})")
    sd = {k: v.detach().to(dtype).contiguous() for k, v in draft.state_dict().items()
          if not k.startswith("lm_head.") and k != "hot_ids"
          and (draft.cfg.has_embed or not k.startswith("embed_tokens."))}
    if hot_ids is not None:
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[hot_ids] = True
        sd.update(d2t=hot_ids - torch.arange(hot_ids.numel()), t2d=t2d)
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
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, existing="merge") as tmp:
        save_file(sd, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
