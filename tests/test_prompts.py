"""The committed prompt set (spec_compiler/data/prompts_{train,dev}.jsonl) keeps its invariants.

Dev must share no template with train, so dev acceptance measures generalisation rather than
recall of a training frame; no template may dominate; and the files are what
tools/make_prompts.py generates (regenerate them after editing it).
"""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "spec_compiler" / "data"
CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "science",
              "humanities"}
FIELDS = {"id", "category", "template", "prompt"}


def _load(name: str) -> list[dict]:
    with open(DATA / f"prompts_{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def parts() -> tuple[list[dict], list[dict]]:
    return _load("train"), _load("dev")


def test_records_have_fields(parts):
    for r in parts[0] + parts[1]:
        assert set(r) == FIELDS, r
        assert all(isinstance(r[k], str) and r[k].strip() for k in FIELDS), r
    ids = [r["id"] for r in parts[0] + parts[1]]
    assert len(set(ids)) == len(ids)


def test_sizes_and_categories(parts):
    train, dev = parts
    assert len(train) + len(dev) >= 500
    assert len(dev) >= 60
    assert 0.10 <= len(dev) / (len(train) + len(dev)) <= 0.20
    assert CATEGORIES <= {r["category"] for r in train}
    assert CATEGORIES <= {r["category"] for r in dev}


def test_no_template_over_5_percent(parts):
    everything = parts[0] + parts[1]
    tid, n = Counter(r["template"] for r in everything).most_common(1)[0]
    assert n <= 0.05 * len(everything), f"template {tid!r} supplies {n} of {len(everything)}"


def test_train_dev_templates_disjoint(parts):
    train, dev = parts
    shared = {r["template"] for r in train} & {r["template"] for r in dev}
    assert not shared, f"templates in both train and dev: {sorted(shared)}"


def test_no_duplicate_prompts(parts):
    texts = [" ".join(r["prompt"].lower().split()) for r in parts[0] + parts[1]]
    dups = [t for t, n in Counter(texts).items() if n > 1]
    assert not dups, dups[:3]


def test_files_match_generator():
    spec = importlib.util.spec_from_file_location("make_prompts", REPO / "tools" / "make_prompts.py")
    make_prompts = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = make_prompts  # dataclasses look their module up there
    try:
        spec.loader.exec_module(make_prompts)
    finally:
        del sys.modules[spec.name]
    for name, text in make_prompts.render().items():
        assert (DATA / name).read_text(encoding="utf-8") == text, (
            f"{name} differs from tools/make_prompts.py output; run: python tools/make_prompts.py")
