"""Fixtures for the pass tests: the tiny target and draft (tests/conftest.py) loaded once."""

from __future__ import annotations

import pytest
import torch

from spec_compiler.loading import load_draft, load_target
from spec_compiler.trees import chain, resolve_tree


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def target(tiny_dir):
    return load_target(tiny_dir)


@pytest.fixture(scope="session")
def draft(tiny_draft_dir, target):
    return load_draft(tiny_draft_dir, target)


@pytest.fixture(scope="session")
def hot_draft(tiny_hot_draft_dir, target):
    """The draft with a reduced vocabulary (tests/helpers.py HOT_IDS): logits over 48 columns."""
    return load_draft(tiny_hot_draft_dir, target)


@pytest.fixture(scope="session")
def bushy():
    return resolve_tree("mc_sim_7b_63")  # 26 nodes, depth 5, top-4


@pytest.fixture(scope="session")
def chain4():
    return chain(4)
