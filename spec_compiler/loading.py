"""Checkpoint directories -> eager modules (meta init, then `load_state_dict(assign=True)`).

Target: a Hugging Face Llama directory (`config.json` + `model.safetensors`, or sharded
safetensors with `model.safetensors.index.json`). Draft: an EAGLE-1/2 or EAGLE-3 head directory
(`config.json` + `model.safetensors`, sharded safetensors with an index, or `pytorch_model.bin`,
the latter read with `weights_only=True`). Names map literally: HF's `model.` prefix is dropped.
An EAGLE-3 head (the reference's names: `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`) is
recognised by its `midlayer.` weights; its config says which target layers feed it
(config.Eagle3Config).

Reduced ("hot-token") draft vocabulary, EAGLE-3's convention, so such heads load as written:
the draft's weights may hold `d2t` (Vd,) int64, with target id = draft index + d2t[draft index],
and `t2d` (V,) bool, True at the hot target ids; its config.json then says `draft_vocab_size`.
The draft's lm_head is `lm_head.weight` (Vd, H) if the head ships one, else the target's rows of
the hot ids. `train.save.save_draft` stores hot ids most frequent first, so any prefix
(`--draft-vocab N`) is a top-N set; a third-party d2t is usually sorted by token id, and its
prefix is not.

`read_draft` reads and checks a draft against the target's config alone (a `DraftSource`), so
`spec-compile` rejects a bad draft before the slow target load and `load_draft` takes the
weights already read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import DraftConfig, Eagle3Config, ModelConfig
from .engine_format import DTYPES, dtype_name
from .errors import SpecCompileError, brief
from .fileio import path_inside, read_json_object
from .models.eagle import EagleDraft
from .models.eagle3 import Eagle3Draft
from .models.llama import Llama, rope_inv_freq



def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SpecCompileError(f"{path}: cannot read safetensors ({brief(e)}); the file is corrupt "
                               "or truncated, re-download it") from None


def read_target_state(model_dir: Path) -> dict[str, torch.Tensor]:
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        return _read_shards(model_dir, index)
    raise SpecCompileError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; "
                           "point at a Hugging Face checkpoint saved with safetensors")


def _read_shards(model_dir: Path, index: Path) -> dict[str, torch.Tensor]:
    """Every shard a safetensors index lists, read into one state dict."""
    files = _shard_files(index)
    state = {}
    for f in files:
        # A shard is a relative name inside MODEL_DIR (no absolute path, no '..'); a symlink
        # in MODEL_DIR is followed wherever it points, as in the Hugging Face cache.
        shard = path_inside(model_dir, f)
        if shard is None:
            raise SpecCompileError(f"{index} lists shard {f!r}, which is not a relative name "
                                   f"inside {model_dir} (absolute or '..'); fix the index's "
                                   "weight_map")
        if not shard.is_file():
            raise SpecCompileError(f"{index} lists shard {f}, which is missing from {model_dir}")
        state.update(_load_safetensors(shard))
    return state


def _shard_files(index: Path) -> list[str]:
    """The shard file names a safetensors index lists (its `weight_map` values), type-checked."""
    data = read_json_object(index, "model", "")
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in wmap.items()):
        raise SpecCompileError(f"{index}: not a valid safetensors index (expected \"weight_map\": an "
                               "object mapping tensor names to shard file names); re-download it")
    return sorted(set(wmap.values()))


def read_draft_state(draft_dir: Path) -> dict[str, torch.Tensor]:
    st, pt = draft_dir / "model.safetensors", draft_dir / "pytorch_model.bin"
    index = draft_dir / "model.safetensors.index.json"
    if st.is_file():
        return _load_safetensors(st)
    if index.is_file():  # an EAGLE-3 lm_head alone can outgrow one file
        return _read_shards(draft_dir, index)
    if pt.is_file():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise SpecCompileError(f"{pt}: cannot load ({_unpickling_reason(e)}); the file is "
                                   "corrupt or not a plain state dict") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise SpecCompileError(f"draft {draft_dir}: the weights file is not a flat state dict")
        return state
    raise SpecCompileError(f"draft {draft_dir}: no model.safetensors, model.safetensors.index.json or "
                           "pytorch_model.bin; point --draft at an EAGLE head directory")


def _unpickling_reason(e: Exception) -> str:
    """torch.load's refusal, short: the weights-only unpickler's own reason (its message wraps it
    in a page of advice: after "WeightsUnpickler error:", or the last paragraph), else the
    exception."""
    text = str(e)
    if not text.startswith("Weights only load failed"):
        return brief(e)
    body = text.split("Check the documentation", 1)[0]
    if "WeightsUnpickler error:" in body:
        body = body.split("WeightsUnpickler error:", 1)[1]
    else:
        body = [p for p in body.split("\n\n") if p.strip()][-1]
    return brief("the weights-only unpickler refused it: " + body.strip().split(". ", 1)[0].rstrip("."))


def _draft_weights_file(draft_dir: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (draft_dir / name).is_file():
            return draft_dir / name
    return draft_dir / "pytorch_model.bin"


def parse_draft_vocab(value: str | int) -> str | int:
    """`--draft-vocab` -> "auto" (the draft's hot list if it has one), "full" or N >= 1."""
    if value in ("auto", "full"):
        return value
    try:
        n = value if isinstance(value, int) and not isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise SpecCompileError(f"--draft-vocab {value!r}: expected auto, full or a positive integer "
                               "N (the first N of the draft's hot tokens)")
    return n


def read_hot_ids(draft_dir: Path, state: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor | None:
    """The draft's hot target ids (Vd,) int64 in stored order, from `d2t` / `t2d` and config.json's
    `draft_vocab_size`, validated against each other and the target's vocabulary; None: full."""
    draft_dir = Path(draft_dir)
    wfile, cfg_path = _draft_weights_file(draft_dir), draft_dir / "config.json"
    n_cfg = read_json_object(cfg_path, "draft").get("draft_vocab_size")
    d2t, t2d = state.get("d2t"), state.get("t2d")
    if d2t is None:
        if t2d is not None:
            raise SpecCompileError(f"draft {wfile}: has t2d but no d2t; a reduced draft vocabulary "
                                   "needs d2t (target id = index + d2t[index]) too, or drop t2d")
        if n_cfg is not None and n_cfg != vocab_size:
            raise SpecCompileError(f"draft {cfg_path}: draft_vocab_size={n_cfg} but {wfile.name} has "
                                   "no d2t table; add d2t/t2d or remove draft_vocab_size")
        return None
    if d2t.dtype not in (torch.int64, torch.int32) or d2t.dim() != 1 or d2t.numel() == 0:
        raise SpecCompileError(f"draft {wfile}: d2t has dtype {d2t.dtype} and shape {tuple(d2t.shape)}, "
                               "expected a non-empty 1-D int64 tensor; re-export the draft")
    vd = d2t.numel()
    if n_cfg is not None and n_cfg != vd:
        raise SpecCompileError(f"draft {cfg_path}: draft_vocab_size={n_cfg} but d2t in {wfile.name} "
                               f"has {vd} entries; set draft_vocab_size to {vd}")
    hot = torch.arange(vd) + d2t.long()
    out = ((hot < 0) | (hot >= vocab_size)).nonzero().flatten()
    if out.numel():
        i = int(out[0])
        raise SpecCompileError(f"draft {wfile}: d2t maps draft index {i} to target id {int(hot[i])}, "
                               f"outside the target's vocabulary [0, {vocab_size}); the table is "
                               "corrupt or for another target")
    ids = hot.sort().values
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.numel():
        raise SpecCompileError(f"draft {wfile}: d2t maps several draft indices to target id "
                               f"{int(dup[0])}; hot token ids must be unique, re-export the draft")
    if t2d is not None:
        if t2d.dtype != torch.bool or tuple(t2d.shape) != (vocab_size,):
            raise SpecCompileError(f"draft {wfile}: t2d has dtype {t2d.dtype} and shape "
                                   f"{tuple(t2d.shape)}, expected bool ({vocab_size},) (True at hot "
                                   "target ids); re-export the draft")
        mark = torch.zeros(vocab_size, dtype=torch.bool)
        mark[hot] = True
        if not torch.equal(mark, t2d):
            n = int(t2d.sum())
            what = f"t2d marks {n} target ids, d2t lists {vd}" if n != vd else "t2d and d2t list different ids"
            raise SpecCompileError(f"draft {wfile}: {what}; t2d must be True exactly at d2t's target "
                                   "ids, re-export the draft")
    return hot


def choose_hot_ids(hot: torch.Tensor | None, draft_vocab: str | int, draft_dir: Path) -> torch.Tensor | None:
    """Apply `--draft-vocab` to the draft's hot list: auto -> as stored, full -> None, N -> first N."""
    draft_vocab = parse_draft_vocab(draft_vocab)
    if draft_vocab == "full" or hot is None and draft_vocab == "auto":
        return None
    if draft_vocab == "auto":
        return hot
    if hot is None:
        raise SpecCompileError(f"--draft-vocab {draft_vocab}: draft {draft_dir} has no hot-token list "
                               "(d2t); use --draft-vocab full, or a draft saved with hot ids")
    if draft_vocab > hot.numel():
        raise SpecCompileError(f"--draft-vocab {draft_vocab}: draft {draft_dir} has {hot.numel()} hot "
                               f"tokens; use at most {hot.numel()}")
    return hot[:draft_vocab]


def _assign(module: torch.nn.Module, state: dict, where: Path, dtype: torch.dtype):
    """Load `state` into the meta-initialised `module`: every weight present, of its shape, of a
    floating dtype where the module's is, and finite once cast to `dtype` (named if not)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise SpecCompileError(f"{where}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                               f" ({len(missing)} in all); the checkpoint does not match its config.json")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise SpecCompileError(f"{where}: weight {k} has shape {tuple(state[k].shape)}, "
                                   f"config.json implies {tuple(v.shape)}")
        if v.is_floating_point() != state[k].is_floating_point():
            raise SpecCompileError(f"{where}: weight {k} has dtype {state[k].dtype}, expected a "
                                   f"{'floating-point' if v.is_floating_point() else str(v.dtype)} "
                                   "tensor; the checkpoint is corrupt or not a Llama/EAGLE checkpoint")
    cast = {k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in expected}
    seen = set()  # tied weights are one tensor: checked once
    for k, t in cast.items():
        # Parameters are another module's weights (the target's, shared with a draft): checked.
        if t.is_floating_point() and not isinstance(state[k], torch.nn.Parameter) and id(t) not in seen:
            seen.add(id(t))
            _check_finite(t, state[k], k, where, dtype)
    module.load_state_dict(cast, assign=True, strict=True)


def _check_finite(t: torch.Tensor, stored: torch.Tensor, name: str, where: Path, dtype: torch.dtype):
    """One pass over `t` in bounded chunks (no full-size temporary)."""
    flat = t.reshape(-1)
    step = 1 << 24
    if all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step)):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bool(torch.isfinite(stored).all()):
        raise SpecCompileError(f"{where}: weight {name} overflows {dtype_name(dtype)} ({bad} values "
                               "become Inf); compile with --dtype float32")
    raise SpecCompileError(f"{where}: weight {name} holds {bad} NaN or Inf values; the checkpoint "
                           "is corrupt (or was saved after training diverged), re-download or "
                           "re-export it")


def _check_layer_count(state: dict, n_layers: int, config: str) -> None:
    """Before building `n_layers` layers (meta init still costs time per layer): the weights
    must hold that many, so a hostile num_hidden_layers costs nothing."""
    held = {int(m.group(1)) for k in state if (m := re.match(r"layers\.([0-9]{1,9})\.", k))}
    if n_layers > len(held):
        raise SpecCompileError(f"{config}: num_hidden_layers={n_layers}, but the weights hold "
                               f"{len(held)} layers; the checkpoint does not match its config.json")


def _finish(module: torch.nn.Module, buffers_from: torch.nn.Module):
    # Non-persistent buffers (rope inv_freq) are not in the state dict: rebuild them off meta.
    for name, buf in buffers_from.named_buffers():
        parent, _, leaf = name.rpartition(".")
        (module.get_submodule(parent) if parent else module)._buffers[leaf] = buf


def load_target(model_dir: str | Path, dtype: str = "float32") -> Llama:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_hf(model_dir)
    state = {k.removeprefix("model."): v for k, v in read_target_state(model_dir).items()}
    _check_layer_count(state, cfg.n_layers, str(model_dir / "config.json"))
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
    m = torch.nn.Module()
    m.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
    return m


@dataclass(frozen=True, eq=False)
class DraftSource:
    """An EAGLE head read from its directory and checked against the target's config: everything
    `load_draft` needs but the target's weights. `str(source)` is the directory."""

    dir: Path
    target: ModelConfig                # the config it was checked against
    state: dict[str, torch.Tensor]     # the weights as stored, HF's `model.` prefix dropped
    cfg: DraftConfig | Eagle3Config    # draft_vocab_size: len(hot), None for the full vocabulary
    stored_hot: torch.Tensor | None    # the hot ids as stored (d2t); None: no list
    hot: torch.Tensor | None           # the ids the draft scores after `draft_vocab`; None: all
    draft_vocab: str | int             # "auto", "full" or N, as chosen

    def __str__(self) -> str:
        return str(self.dir)


def read_draft(draft_dir: str | Path, target: ModelConfig, draft_vocab: str | int = "auto") -> DraftSource:
    """Read an EAGLE head's weights and config once and check them against the target's config:
    fc shape, embedding shape, the hot-token tables (d2t / t2d) and `draft_vocab` (see load_draft)."""
    draft_dir = Path(draft_dir)
    draft_vocab = parse_draft_vocab(draft_vocab)
    state = {k.removeprefix("model."): v for k, v in read_draft_state(draft_dir).items()}
    if any(k.startswith("midlayer.") for k in state):
        return _read_eagle3(draft_dir, target, state, draft_vocab)
    if "fc.weight" not in state:
        raise SpecCompileError(f"draft {draft_dir}: no fc.weight; not an EAGLE-1/2 head "
                               "(expected fc.weight [h, 2h] and layers.N.*)")
    cfg = DraftConfig.from_dir(draft_dir, target, has_embed="embed_tokens.weight" in state)
    _check_layer_count(state, cfg.n_layers, f"draft {draft_dir / 'config.json'}")
    fc = state["fc.weight"]
    if tuple(fc.shape) != (cfg.layer.hidden_size, 2 * cfg.layer.hidden_size):
        raise SpecCompileError(f"draft {draft_dir}: fc.weight has shape {tuple(fc.shape)}, expected "
                               f"{(cfg.layer.hidden_size, 2 * cfg.layer.hidden_size)} for the target's "
                               "hidden size; use a draft trained for this target")
    embed = (target.vocab_size, target.hidden_size)
    if cfg.has_embed and tuple(state["embed_tokens.weight"].shape) != embed:
        raise SpecCompileError(f"draft {draft_dir}: embed_tokens.weight has shape "
                               f"{tuple(state['embed_tokens.weight'].shape)}, the target's is {embed}")
    stored = read_hot_ids(draft_dir, state, target.vocab_size)
    hot = choose_hot_ids(stored, draft_vocab, draft_dir)
    cfg = DraftConfig(cfg.n_layers, "fc.bias" in state, cfg.has_embed, cfg.layer,
                      None if hot is None else hot.numel())
    return DraftSource(draft_dir, target, state, cfg, stored, hot, draft_vocab)


def _read_eagle3(draft_dir: Path, target: ModelConfig, state: dict, draft_vocab: str | int) -> DraftSource:
    """read_draft for an EAGLE-3 head (reference names: fc, midlayer.*, norm, lm_head, d2t, t2d):
    its own lm_head over its draft vocabulary (d2t), so `--draft-vocab full` cannot apply."""
    cfg = Eagle3Config.from_dir(draft_dir, target, has_embed="embed_tokens.weight" in state)
    wfile, h = _draft_weights_file(draft_dir), cfg.layer.hidden_size
    for name, shape in (("fc.weight", (h, 3 * cfg.target_hidden_size)),
                        ("embed_tokens.weight", (target.vocab_size, h))):
        if name in state and tuple(state[name].shape) != shape:
            raise SpecCompileError(f"draft {wfile}: {name} has shape {tuple(state[name].shape)}, expected "
                                   f"{shape} for this target; use a draft trained for this target")
    if "lm_head.weight" not in state:
        raise SpecCompileError(f"draft {wfile}: an EAGLE-3 head needs its own lm_head.weight; the "
                               "checkpoint is incomplete")
    stored = read_hot_ids(draft_dir, state, target.vocab_size)
    if draft_vocab == "full" and stored is not None:
        raise SpecCompileError(f"--draft-vocab full: EAGLE-3 draft {draft_dir} scores only its own "
                               f"{stored.numel()}-token vocabulary; use auto or at most {stored.numel()}")
    hot = choose_hot_ids(stored, draft_vocab, draft_dir)
    rows = target.vocab_size if stored is None else stored.numel()
    if tuple(state["lm_head.weight"].shape) != (rows, h):
        raise SpecCompileError(f"draft {wfile}: lm_head.weight has shape {tuple(state['lm_head.weight'].shape)}, "
                               f"expected {(rows, h)} (one row per draft-vocabulary token)")
    cfg = dataclasses.replace(cfg, draft_vocab_size=None if hot is None else hot.numel())
    return DraftSource(draft_dir, target, state, cfg, stored, hot, draft_vocab)


def load_draft(draft: str | Path | DraftSource, target: Llama, dtype: str = "float32",
               draft_vocab: str | int = "auto") -> EagleDraft | Eagle3Draft:
    """Load an EAGLE head; the target's embedding (unless the head has one) and lm_head are shared.

    `draft`: the head's directory, or a `read_draft` result (its weights are not read again).
    `draft_vocab`: "auto" uses the head's hot-token list (d2t) if it has one, else the full
    vocabulary; "full" ignores the list (the target's whole lm_head); N uses its first N ids.
    With a DraftSource it was chosen by read_draft: pass "auto" or the same value."""
    if isinstance(draft, DraftSource):
        if parse_draft_vocab(draft_vocab) not in ("auto", draft.draft_vocab):
            raise ValueError(f"load_draft: draft_vocab={draft_vocab!r}, but {draft} was read with "
                             f"{draft.draft_vocab!r}")
        if draft.target != target.cfg:
            raise ValueError(f"load_draft: {draft} was checked against another target config")
        src = draft
    else:
        src = read_draft(draft, target.cfg, draft_vocab)
    cfg, hot, state = src.cfg, src.hot, dict(src.state)
    state.setdefault("embed_tokens.weight", target.embed_tokens.weight)
    eagle3 = isinstance(cfg, Eagle3Config)
    if eagle3:  # its own lm_head rows, in stored d2t order
        if hot is not None:
            state["lm_head.weight"] = state["lm_head.weight"][:hot.numel()]
    elif hot is None:
        state["lm_head.weight"] = target.lm_head.weight
    else:
        state["lm_head.weight"] = _hot_lm_head(src.dir, state.get("lm_head.weight"), src.stored_hot,
                                               hot, target)
    if hot is not None:
        state["hot_ids"] = hot
    with torch.device("meta"):
        head = (Eagle3Draft if eagle3 else EagleDraft)(cfg, target.cfg)
    _assign(head, state, src.dir, DTYPES[dtype])
    if not cfg.has_embed:
        head.embed_tokens.weight = target.embed_tokens.weight
    if hot is None and not eagle3:
        head.lm_head.weight = target.lm_head.weight
    _finish(head, _buffers(cfg.layer))
    return head.eval()


def _hot_lm_head(draft_dir: Path, own: torch.Tensor | None, stored: torch.Tensor, hot: torch.Tensor,
                 target: Llama) -> torch.Tensor:
    """(len(hot), H): the head's own lm_head rows (one per stored hot id) if it ships them, else
    a copy of the target's rows of the hot ids (never a view: the engine stores it on its own)."""
    full = target.lm_head.weight
    if own is not None and tuple(own.shape) == (stored.numel(), full.shape[1]):
        return own if hot.numel() == stored.numel() else own[:hot.numel()].clone()
    if own is not None and tuple(own.shape) != tuple(full.shape):
        raise SpecCompileError(f"draft {_draft_weights_file(draft_dir)}: lm_head.weight has shape "
                               f"{tuple(own.shape)}, expected ({stored.numel()}, {full.shape[1]}) "
                               "(one row per d2t entry); fix or drop it to use the target's rows")
    return full.detach().index_select(0, hot.to(full.device))
