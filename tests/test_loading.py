"""Checkpoint formats and configurations: sharded safetensors, pytorch_model.bin drafts,
multi-layer drafts, rope settings in both transformers layouts, eos as int or list."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import make_random_draft, make_tiny_checkpoint
from spec_compiler.config import ModelConfig, rope_inv_freq
from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_draft, load_target


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
