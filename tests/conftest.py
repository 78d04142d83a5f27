"""Shared fixtures: tiny random Llama checkpoints (HF format) and EAGLE heads, written to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> LlamaConfig overrides. All fp32, 2 layers, vocab 128: fast, and decisive enough logits
# (initializer_range 0.3) that greedy argmax is far from ties.
TINY_CONFIGS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                        tie_word_embeddings=False, eos_token_id=[5, 7],
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                         "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
}


def make_tiny_checkpoint(out: Path, name: str = "gqa_untied", seed: int = 0, **over) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              initializer_range=0.3, eos_token_id=2, bos_token_id=1, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(TINY_CONFIGS[name])
    kw.update(over)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(out)
    return out


def make_random_draft(out: Path, target_dir: Path, n_layers: int = 1, seed: int = 1) -> Path:
    from spec_compiler.loading import load_target, save_draft
    from spec_compiler.config import DraftConfig
    from spec_compiler.models.eagle import EagleDraft

    target = load_target(target_dir)
    cfg = DraftConfig(n_layers=n_layers, fc_bias=True, has_embed=False, layer=target.cfg)
    torch.manual_seed(seed)
    draft = EagleDraft(cfg, target.cfg)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)
    save_draft(draft, out, dtype=torch.float32)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(root / name, name) for name in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs) -> Path:
    return tiny_dirs["gqa_untied"]


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory, tiny_dir) -> Path:
    return make_random_draft(tmp_path_factory.mktemp("draft") / "d", tiny_dir)


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if cuda else 0
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ CUDA GPUs"))
