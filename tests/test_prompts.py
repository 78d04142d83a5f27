"""The committed prompt set (spec_compiler/data/prompts_{train,dev,train_wide}.jsonl) keeps its
invariants.

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


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def make_prompts():
    return _tool("make_prompts")


def test_files_match_generator(make_prompts):
    for name, text in make_prompts.render().items():
        assert (DATA / name).read_text(encoding="utf-8") == text, (
            f"{name} differs from tools/make_prompts.py output; run: python tools/make_prompts.py")


# ---- the wide training set (templated + the target's own prompts) ----

def test_wide_set_keeps_train_and_stays_apart_from_dev(parts, make_prompts):
    train, dev = parts
    wide = _load("train_wide")
    texts = [" ".join(r["prompt"].lower().split()) for r in wide]
    assert len(set(texts)) == len(texts)
    assert {r["prompt"] for r in train} <= {r["prompt"] for r in wide}
    assert len(wide) >= 2.5 * len(train)
    assert not {r["template"] for r in wide} & {r["template"] for r in dev}
    dev_texts = [r["prompt"] for r in dev]
    train_texts = {r["prompt"] for r in train}
    clashes = [r["prompt"] for r in wide if r["prompt"] not in train_texts
               and make_prompts.dev_clash(r["prompt"], dev_texts)]
    assert not clashes, clashes[:3]
    tid, n = Counter(r["template"] for r in wide + dev).most_common(1)[0]
    assert n <= make_prompts.WIDE_MAX_SHARE * len(wide + dev), (tid, n)
    assert CATEGORIES <= {r["category"] for r in wide}
    written = [r for r in wide if r["template"].startswith("self-")]
    assert len(written) >= 200  # the target's own prompts are in it
    assert len({r["id"] for r in wide}) == len(wide) and all(set(r) == FIELDS for r in wide)


def test_dev_clash_catches_a_dev_frame(make_prompts):
    dev = ["Solve for x: 4x + 10 = 34. Show your steps.", "Explain how a lightning bolt forms in simple terms."]
    assert make_prompts.dev_clash("solve for x:  2x + 1 = 5. Show your steps.", dev)  # opening
    assert make_prompts.dev_clash("Explain why the sky is blue in simple terms.", dev)  # closing
    assert make_prompts.dev_clash("EXPLAIN how a lightning bolt forms in simple terms.", dev)
    assert not make_prompts.dev_clash("Explain how a rainbow forms, with a diagram.", dev)


def test_self_written_prompts_are_cleaned():
    clean = _tool("self_prompts").clean
    assert clean(" 1. What's the biggest black hole ever discovered?\n", "black holes") == \
        "What's the biggest black hole ever discovered?"
    assert clean('Question: "How do SQL joins handle missing rows?"', "SQL joins") == \
        "How do SQL joins handle missing rows?"
    assert clean("What is a join and what does it do?", "SQL joins") is not None  # "join" ~ "joins"
    assert clean("How did the ancient Greeks measure a star?", "black holes") is None  # off topic
    assert clean("I'm happy to help with black holes!", "black holes") is None  # the assistant talking
    assert clean("black holes are big", "black holes") is None  # not a request
    assert clean("Why?", "black holes") is None  # too short


def test_fit_wide_prompts_are_the_wide_corpus_held_out_prompts():
    """prompts_fit_wide.jsonl is what tools/heldout_prompts.py writes: the wide set's prompts
    that spec-train --corpus holds out (default --val-frac), so the committed wide corpus's
    training split holds none of them and its validation split all of them."""
    from spec_compiler.train.corpus import read_corpus, split_by_prompt

    mod = _tool("heldout_prompts")
    wide = (DATA / "prompts_train_wide.jsonl").read_text().splitlines()
    fit = (DATA / "prompts_fit_wide.jsonl").read_text().splitlines()
    assert fit == mod.heldout(wide, 0.05) and len(fit) == 106
    train, val = split_by_prompt(read_corpus(REPO / "corpora" / "smollm2-wide"), 0.05)
    texts = {json.loads(x)["prompt"] for x in fit}
    assert {json.loads(wide[s.prompt_index])["prompt"] for s in val} == texts
    assert not texts & {json.loads(wide[s.prompt_index])["prompt"] for s in train}
