"""Checkpoint formats and configurations: sharded safetensors, pytorch_model.bin drafts,
multi-layer drafts, rope settings in both transformers layouts, eos as int or list, and the
reduced draft vocabulary (d2t / t2d / draft_vocab_size): round trip, prefixes, bad tables."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import HOT_IDS, copy_draft, d2t_of, make_random_draft, make_tiny_checkpoint
from spec_compiler.config import ModelConfig
from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_draft, load_target
from spec_compiler.models.llama import rope_inv_freq
from spec_compiler.train.save import save_draft


def _logits(model, tokens):
    kv = [torch.zeros(model.cache_shape(1, 32)) for _ in range(2 * len(model.layers))]
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None], torch.tensor([0]), *kv)[0]


def test_sharded_safetensors_equal_single_file(tmp_path, tiny_dir):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    toks = torch.randint(0, 128, (1, 7))
    assert torch.equal(_logits(load_target(sharded), toks), _logits(load_target(tiny_dir), toks))


def test_missing_shard_is_a_clear_error(tmp_path, tiny_dir):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(sharded, max_shard_size="50KB")
    next(sharded.glob("model-*.safetensors")).unlink()
    with pytest.raises(SpecCompileError, match="missing"):
        load_target(sharded)


def test_draft_from_pytorch_model_bin(tmp_path, tiny_dir, tiny_draft_dir):
    from safetensors.torch import load_file

    d = tmp_path / "bin_draft"
    shutil.copytree(tiny_draft_dir, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    target = load_target(tiny_dir)
    a, b = load_draft(d, target), load_draft(tiny_draft_dir, target)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_multi_layer_draft(tmp_path, tiny_dir):
    d = make_random_draft(tmp_path / "d3", tiny_dir, n_layers=3)
    draft = load_draft(d, load_target(tiny_dir))
    assert draft.cfg.n_layers == 3 and len(draft.layers) == 3
    assert draft.layers[0].input_layernorm is None and draft.layers[1].input_layernorm is not None


def test_rope_layouts_and_eos(tmp_path):
    """transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) give the same config."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    d5 = make_tiny_checkpoint(tmp_path / "v5", "llama3_rope")
    c5 = ModelConfig.from_hf(d5)
    cfg = json.loads((d5 / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=500000.0, rope_scaling=scaling, eos_token_id=5)
    (d5 / "config.json").write_text(json.dumps(cfg))
    c4 = ModelConfig.from_hf(d5)
    assert c5.rope_theta == c4.rope_theta == 500000.0 and c5.rope_scaling == c4.rope_scaling
    assert c5.eos_token_ids == (5, 7) and c4.eos_token_ids == (5,)
    assert torch.equal(rope_inv_freq(c4), rope_inv_freq(c5))


def test_unsupported_rope_type(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "gqa_untied")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecCompileError, match="yarn"):
        ModelConfig.from_hf(d)


# ---- reduced ("hot-token") draft vocabulary: d2t / t2d / draft_vocab_size ----

def _hot_target_and_draft(tiny_dir, hot_dir, **kw):
    target = load_target(tiny_dir)
    return target, load_draft(hot_dir, target, **kw)


def test_hot_vocab_round_trip(tmp_path, tiny_dir, tiny_draft_dir, tiny_hot_draft_dir):
    from safetensors.torch import load_file

    hot = torch.tensor(HOT_IDS)
    st = load_file(tiny_hot_draft_dir / "model.safetensors")
    assert st["d2t"].dtype == torch.int64 and st["d2t"].shape == (48,)
    assert torch.equal(torch.arange(48) + st["d2t"], hot)  # target id = index + d2t[index], in order
    assert st["t2d"].dtype == torch.bool and st["t2d"].shape == (128,)
    assert st["t2d"].nonzero().flatten().tolist() == sorted(HOT_IDS)
    assert "lm_head.weight" not in st and "hot_ids" not in st
    assert json.loads((tiny_hot_draft_dir / "config.json").read_text())["draft_vocab_size"] == 48

    target, draft = _hot_target_and_draft(tiny_dir, tiny_hot_draft_dir)  # auto: the hot list
    full = load_draft(tiny_draft_dir, target)  # the same random head, full vocabulary
    assert draft.cfg.draft_vocab_size == 48 and torch.equal(draft.hot_ids, hot)
    assert draft.lm_head.weight.shape == (48, 64)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight[hot])
    assert draft.lm_head.weight.data_ptr() != target.lm_head.weight.data_ptr()  # its own tensor
    assert draft.embed_tokens.weight is target.embed_tokens.weight
    # Column j scores target token hot[j]: the hot logits are the full head's hot columns.
    x = (torch.randint(0, 128, (1, 5)), torch.randn(1, 5, 64), torch.arange(5)[None], torch.tensor([0]))
    kv = [torch.zeros(draft.cache_shape(1, 16)) for _ in range(2)]
    with torch.no_grad():
        lh, lf = draft(*x, *kv)[0], full(*x, *kv)[0]
    assert lh.shape == (1, 5, 48)
    torch.testing.assert_close(lh, lf[..., hot], rtol=1e-5, atol=1e-4)
    assert torch.equal(draft.token_ids(lh.argmax(-1)), hot[lh.argmax(-1)])

    # A prefix N is the first N ids (the most frequent); "full" ignores the list.
    d10 = load_draft(tiny_hot_draft_dir, target, draft_vocab=10)
    assert d10.cfg.draft_vocab_size == 10 and d10.hot_ids.tolist() == HOT_IDS[:10]
    assert torch.equal(d10.lm_head.weight, target.lm_head.weight[hot[:10]])
    dfull = load_draft(tiny_hot_draft_dir, target, draft_vocab="full")
    assert dfull.cfg.draft_vocab_size is None and dfull.hot_ids is None
    assert dfull.lm_head.weight is target.lm_head.weight
    assert load_draft(tiny_draft_dir, target).hot_ids is None  # no list: auto is full

    # Saving a hot draft keeps its list (default hot_ids) and order.
    save_draft(d10, tmp_path / "again", dtype=torch.float32)
    again = load_draft(tmp_path / "again", target)
    assert again.hot_ids.tolist() == HOT_IDS[:10]
    for k, v in d10.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_hot_vocab_own_lm_head(tmp_path, tiny_dir, tiny_hot_draft_dir):
    """A head that ships lm_head.weight (Vd, H) (EAGLE-3 style) uses it, row i for d2t entry i."""
    d = _copy_with(tmp_path, tiny_hot_draft_dir, lambda st: st.update({"lm_head.weight": torch.randn(48, 64)}))
    own = _state(d)["lm_head.weight"]
    target = load_target(tiny_dir)
    assert torch.equal(load_draft(d, target).lm_head.weight, own)
    assert torch.equal(load_draft(d, target, draft_vocab=5).lm_head.weight, own[:5])


def _state(d):
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


def _copy_with(tmp_path, src, edit_state=None, **config):
    return copy_draft(src, tmp_path / "edited", edit_state, **config)


def _set(key, fn):
    return lambda st: st.update({key: fn(st)})


# (state edit, config edits, draft_vocab, words in the error)
BAD_HOT = {
    "d2t-out-of-range": (_set("d2t", lambda st: d2t_of(HOT_IDS[:3] + [500] + HOT_IDS[4:])), {}, "auto",
                         ["d2t", "index 3", "target id 500", "[0, 128)", "model.safetensors"]),
    "d2t-duplicate": (_set("d2t", lambda st: d2t_of(HOT_IDS[:1] * 2 + HOT_IDS[2:])), {}, "auto",
                      ["d2t", "unique", f"target id {HOT_IDS[0]}"]),
    "d2t-float": (_set("d2t", lambda st: st["d2t"].float()), {}, "auto", ["d2t", "float32", "int64"]),
    "d2t-2d": (_set("d2t", lambda st: st["d2t"][None]), {}, "auto", ["d2t", "(1, 48)", "1-D"]),
    "t2d-inconsistent": (_set("t2d", lambda st: ~st["t2d"]), {}, "auto", ["t2d", "80", "48"]),
    "t2d-other-ids": (_set("t2d", lambda st: st["t2d"].roll(1)), {}, "auto", ["t2d", "different"]),
    "t2d-shape": (_set("t2d", lambda st: st["t2d"][:100]), {}, "auto", ["t2d", "(100,)", "(128,)"]),
    "t2d-without-d2t": (lambda st: st.pop("d2t"), {}, "auto", ["t2d", "no d2t"]),
    "config-mismatch": (None, {"draft_vocab_size": 40}, "auto", ["config.json", "draft_vocab_size=40", "48"]),
    "config-without-d2t": (lambda st: (st.pop("d2t"), st.pop("t2d")), {}, "auto", ["draft_vocab_size=48", "no d2t"]),
    "lm-head-shape": (_set("lm_head.weight", lambda st: torch.randn(47, 64)), {}, "auto", ["lm_head.weight", "(47, 64)", "(48, 64)"]),
    "n-too-large": (None, {}, 49, ["--draft-vocab 49", "48 hot tokens"]),
    "n-zero": (None, {}, 0, ["--draft-vocab", "positive integer"]),
    "n-not-a-number": (None, {}, "lots", ["--draft-vocab 'lots'", "auto, full"]),
}


@pytest.mark.parametrize("case", list(BAD_HOT))
def test_bad_hot_vocab(tmp_path, tiny_dir, tiny_hot_draft_dir, case):
    edit, config, draft_vocab, words = BAD_HOT[case]
    d = _copy_with(tmp_path, tiny_hot_draft_dir, edit, **config)
    with pytest.raises(SpecCompileError) as e:
        load_draft(d, load_target(tiny_dir), draft_vocab=draft_vocab)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_draft_vocab_n_needs_a_hot_list(tiny_dir, tiny_draft_dir):
    with pytest.raises(SpecCompileError, match="no hot-token list"):
        load_draft(tiny_draft_dir, load_target(tiny_dir), draft_vocab=10)


def test_save_draft_rejects_bad_hot_ids(tmp_path, tiny_dir, tiny_draft_dir):
    draft = load_draft(tiny_draft_dir, load_target(tiny_dir))
    for bad in (torch.tensor([1, 2, 2]), torch.tensor([1, 128]), torch.tensor([-1]), torch.tensor([1.0, 2.0]),
                torch.tensor([[1, 2]]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(SpecCompileError, match="hot_ids"):
            save_draft(draft, tmp_path / "x", hot_ids=bad)
    assert not (tmp_path / "x").exists()


def test_read_draft_then_load_reads_the_weights_once(tiny_dir, tiny_hot_draft_dir, monkeypatch):
    """read_draft checks a head against the target's config alone; load_draft takes it as read
    (what spec-compile does: bad drafts fail before the slow target load, weights read once)."""
    from spec_compiler import loading

    target = load_target(tiny_dir)
    src = loading.read_draft(tiny_hot_draft_dir, target.cfg, draft_vocab=10)
    assert str(src) == str(tiny_hot_draft_dir)
    assert src.cfg.draft_vocab_size == 10 and src.hot.tolist() == HOT_IDS[:10]
    assert src.stored_hot.tolist() == HOT_IDS
    monkeypatch.setattr(loading, "read_draft_state", lambda d: pytest.fail("weights read again"))
    a = load_draft(src, target)
    monkeypatch.undo()
    b = load_draft(tiny_hot_draft_dir, target, draft_vocab=10)
    assert a.cfg == b.cfg and a.state_dict().keys() == b.state_dict().keys()
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    with pytest.raises(ValueError, match="draft_vocab"):
        load_draft(src, target, draft_vocab="full")
    with pytest.raises(SpecCompileError, match="--draft-vocab 49"):
        loading.read_draft(tiny_hot_draft_dir, target.cfg, draft_vocab=49)


def test_save_draft_is_atomic_and_keeps_other_files(tmp_path, tiny_dir, tiny_draft_dir, tiny_hot_draft_dir,
                                                    monkeypatch):
    """save_draft swaps config.json + model.safetensors in together; files it does not write stay."""
    import safetensors.torch

    target = load_target(tiny_dir)
    out = tmp_path / "d"
    save_draft(load_draft(tiny_draft_dir, target), out, dtype=torch.float32)
    (out / "tree.json").write_text("[[0]]")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    hot = load_draft(tiny_hot_draft_dir, target)

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_draft(hot, out, dtype=torch.float32)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    save_draft(hot, out, dtype=torch.float32)
    assert (out / "tree.json").read_text() == "[[0]]"
    assert load_draft(out, target).hot_ids.tolist() == HOT_IDS


def test_a_draft_past_the_shard_size_is_written_in_shards_and_reads_back(tmp_path, tiny_dir, tiny_draft_dir):
    """Weights past the shard size go into Hugging Face shards with an index (each file under the
    limit unless one tensor is larger), which read back to the same draft; saving again in the
    other layout leaves no stale weights file, and the accept table's weights hash follows."""
    from spec_compiler.train import save
    from spec_compiler.tree_choice import draft_weights_sha256

    target = load_target(tiny_dir)
    draft = load_draft(tiny_draft_dir, target)
    sd = {k: v for k, v in draft.state_dict().items() if not k.startswith("lm_head.")}
    limit = max(v.numel() * 4 for v in sd.values()) + 1  # every tensor fits; the whole does not
    out = tmp_path / "d"
    cfg = json.loads((tiny_draft_dir / "config.json").read_text())
    save._write(out, {k: v.float().contiguous() for k, v in sd.items()}, cfg, {"training.json": "{}"},
                shard_bytes=limit)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / f).stat().st_size <= limit + 4096 for f in shards)  # + each file's header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards and set(index["weight_map"]) == set(sd)
    back = load_draft(out, target)
    for k, v in draft.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    sharded_hash = draft_weights_sha256(out)
    assert sharded_hash is not None
    save_draft(draft, out, dtype=torch.float32)  # one file again: the shards and index go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert draft_weights_sha256(out) != sharded_hash
    save._write(out, {k: v.float().contiguous() for k, v in sd.items()}, cfg, None, shard_bytes=limit)
    assert not (out / "model.safetensors").exists() and draft_weights_sha256(out) == sharded_hash
