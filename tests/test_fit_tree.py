"""spec-fit-tree: rank paths equal a level-by-level reference, the fitted tree is the most
frequent prefixes with the expected acceptance they imply, the acceptance table it writes
(accept.json) holds them, and spec-compile --tree auto weighs the table's trees (the fitted one
among them), or builds tree.json itself when there is no table."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_random_draft
from spec_compiler.cli import compile_main
from spec_compiler.loading import load_draft, load_target
from spec_compiler.train.fit_tree import best_tree, expected_tpc, main, prefix_rates, rank_paths
from spec_compiler.train.generate import generate
from spec_compiler.trees import resolve_tree


def _reference_ranks(draft, s, depth, top_k):
    """From scratch per start: true pairs 0..i, then the target's tokens with the draft's features."""
    x, f, P, L = s.tokens, s.features, s.prompt_len, len(s.tokens)
    hot = None if draft.hot_ids is None else draft.hot_ids.tolist()
    out = []
    for i in range(P - 1, L - 1 - depth):
        kv = [torch.zeros(draft.cache_shape(1, L + depth)) for _ in range(2 * draft.cfg.n_layers)]
        lg, g, *kv = draft(x[None, 1:i + 2], f[None, :i + 1], torch.arange(i + 1)[None],
                           torch.zeros(1, dtype=torch.long), *kv)
        lg, g, ranks = lg[0, -1], g[:, -1:], []
        for d in range(depth):
            want = int(x[i + 2 + d])
            if hot is not None and want not in hot:
                break
            score = lg[want if hot is None else hot.index(want)]
            r = int((lg > score).sum())
            if r >= top_k:
                break
            ranks.append(r)
            pos = torch.tensor([i + 1 + d])
            lg, g, *kv = draft(torch.tensor([[want]]), g, pos[None], pos, *kv)
            lg = lg[0, 0]
        out.append(tuple(ranks))
    return out


@pytest.mark.parametrize("hot", [False, True])
def test_rank_paths_match_level_by_level_drafting(tiny_dir, tiny_draft_dir, tmp_path, hot):
    target = load_target(tiny_dir)
    seqs = generate(target, [[5, 17, 3], [99, 4, 8, 23, 61, 2, 7]], 12, eos_ids=())
    draft_dir = tiny_draft_dir
    if hot:  # hot: the tokens the target continues with, but one (paths through it must end)
        seen = sorted({int(t) for s in seqs for t in s.tokens[s.prompt_len:]})
        draft_dir = make_random_draft(tmp_path / "hot", tiny_dir, hot_ids=seen[1:])
    draft = load_draft(draft_dir, target)
    assert (draft.hot_ids is not None) == hot
    got = rank_paths(draft, seqs, depth=4, top_k=40)  # wide: a random draft ranks poorly
    want = sum((_reference_ranks(draft, s, 4, 40) for s in seqs), [])
    assert got == want
    assert any(len(p) > 1 for p in got)  # the check reaches past level 1


def test_best_tree_is_the_most_frequent_prefixes():
    paths = [(0, 0, 1), (0, 0), (0, 1), (1,), (1, 0), (), (0, 0, 0), (2,)]
    rates = prefix_rates(paths)
    assert rates[(0,)] == 4 / 8 and rates[(0, 0)] == 3 / 8 and rates[(1,)] == 2 / 8
    assert rates[(0, 0, 1)] == 1 / 8 and () not in rates
    tree = best_tree(rates, 5)
    assert set(tree.paths) == {(0,), (0, 0), (1,), (2,)}  # ties at 1/8: the shorter path
    assert expected_tpc(tree, rates) == pytest.approx(1 + (4 + 3 + 2 + 1) / 8)
    # The fitted tree beats any other tree of its size on its own data, e.g. a chain.
    assert expected_tpc(tree, rates) >= expected_tpc(resolve_tree("chain-4"), rates)


def test_cli_writes_tree_and_table_and_compile_auto_uses_them(tiny_dir, tiny_draft_dir, tmp_path, capsys):
    from spec_compiler.tree_choice import ACCEPT, AcceptTable, draft_weights_sha256

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [3 + i, 40 + 2 * i, 7]}) + "\n" for i in range(6)))
    draft = tmp_path / "draft"
    draft.mkdir()
    for f in tiny_draft_dir.iterdir():
        (draft / f.name).write_bytes(f.read_bytes())
    assert main([str(tiny_dir), str(draft), "--prompts", str(prompts), "--max-new-tokens", "10",
                 "--nodes", "9", "--max-depth", "3", "--top-k", "40"]) == 0
    table = capsys.readouterr().out
    assert "fitted | 9 |" in table and "mc_sim_7b_63 | 26 |" in table
    paths = [tuple(p) for p in json.loads((draft / "tree.json").read_text())]
    assert len(paths) == 8 and max(map(len, paths)) <= 3 and max(max(p) for p in paths) < 40

    acc = AcceptTable.read(draft / ACCEPT)  # the table: the fitted tree is its 8 most frequent paths
    assert acc.fitted(9).paths == resolve_tree(str(draft / "tree.json")).paths
    assert acc.n_starts == 6 * (3 + 10 - 3 - 3)  # per prompt: starts P-1 .. L-2-depth (L = P + 10)
    raw = json.loads((draft / ACCEPT).read_text())
    rates = [r for _, r in raw["paths"]]
    assert rates == sorted(rates, reverse=True) and all(0 < r <= 1 for r in rates)
    assert raw["command"].startswith("spec-fit-tree ") and "--top-k 40" in raw["command"]
    assert raw["settings"]["max_depth"] == 3 and raw["draft_sha256"] == draft_weights_sha256(draft)

    out = tmp_path / "engine"
    flags = ["--draft", str(draft), "--backend", "eager", "--max-seq-len", "64", "--prefill-chunk", "8",
             "--dispatch", "predicted"]  # the cost model's choice itself (measured: test_tree_choice)
    # --tree fitted-N: that table's best N-node tree, built as given (no choice made)
    assert compile_main([str(tiny_dir), "--out", str(tmp_path / "fitted"), "--tree", "fitted-5", *flags]) == 0
    manifest = json.loads((tmp_path / "fitted" / "manifest.json").read_text())
    assert manifest["tree"]["name"] == "fitted-5" and manifest["tree_choice"] is None
    assert sorted(map(tuple, manifest["tree"]["paths"])) == sorted(acc.fitted(5).paths)
    assert len(acc.fitted(5).paths) == 4

    assert compile_main([str(tiny_dir), "--out", str(out), *flags]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    choice = manifest["tree_choice"]["buckets"]["1"]  # one bucket: batch 1
    cands = {r["name"]: r for r in choice["candidates"]}
    assert sorted(map(tuple, cands["tree"]["paths"])) == sorted(paths)  # tree.json is a candidate
    chosen = cands[choice["choice"]]
    assert manifest["tree_choice"]["choice"] == {"1": choice["choice"]}
    assert sorted(tuple(p) for p in manifest["tree"]["paths"]) == sorted(map(tuple, chosen["paths"]))

    (draft / ACCEPT).unlink()  # no table: --tree auto builds tree.json as it is
    assert compile_main([str(tiny_dir), "--out", str(tmp_path / "engine2"), *flags]) == 0
    manifest = json.loads((tmp_path / "engine2" / "manifest.json").read_text())
    assert sorted(tuple(p) for p in manifest["tree"]["paths"]) == sorted(paths)
    assert manifest["tree_choice"] is None


def test_cli_bad_input_one_line(tiny_dir, tmp_path, capsys):
    assert main([str(tiny_dir), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "DRAFT_DIR" in err and "\n" not in err


@pytest.mark.parametrize("flag", ["--out", "--accept-out"])
def test_cli_output_folder_missing_is_one_line_before_work(tiny_dir, tiny_draft_dir, tmp_path, capsys, flag):
    """An output path in a folder that does not exist stops at once (not after the continuations)
    with one line naming the flag and the folder, and writes nothing."""
    before = sorted(p.name for p in tiny_draft_dir.iterdir())
    assert main([str(tiny_dir), str(tiny_draft_dir), flag, str(tmp_path / "nope" / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} ") and "nope" in err and "does not exist" in err and "\n" not in err
    assert sorted(p.name for p in tiny_draft_dir.iterdir()) == before and not (tmp_path / "nope").exists()


@pytest.mark.parametrize("case", ["no-draft", "no-table", "stale-table", "zero", "too-many"])
def test_tree_fitted_n_bad_input_is_one_line(tiny_dir, tiny_draft_dir, tmp_path, capsys, case):
    """--tree fitted-N without a draft, without its acceptance table, with a table made for other
    weights, or with N out of range: one line naming the fix, before any work, no engine."""
    from spec_compiler.kernels.limits import MAX_TREE_NODES
    from spec_compiler.tree_choice import ACCEPT, ACCEPT_FORMAT

    draft = tmp_path / "draft"
    draft.mkdir()
    for f in tiny_draft_dir.iterdir():
        (draft / f.name).write_bytes(f.read_bytes())
    (draft / ACCEPT).unlink(missing_ok=True)
    if case != "no-table":
        (draft / ACCEPT).write_text(json.dumps({"format": ACCEPT_FORMAT, "n_starts": 10, "paths": [[[0], 0.5]],
                                                "draft_sha256": "0" * 64 if case == "stale-table" else None}))
    tree = {"zero": "fitted-0", "too-many": f"fitted-{MAX_TREE_NODES + 1}"}.get(case, "fitted-8")
    argv = [str(tiny_dir), "--out", str(tmp_path / "e"), "--tree", tree, "--backend", "eager"]
    rc = compile_main(argv + ([] if case == "no-draft" else ["--draft", str(draft)]))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    want = {"no-draft": "needs --draft DRAFT_DIR", "no-table": "does not exist; make it with spec-fit-tree",
            "stale-table": "was made for other draft weights; rerun spec-fit-tree",
            "zero": f"N must be 1..{MAX_TREE_NODES}", "too-many": f"N must be 1..{MAX_TREE_NODES}"}[case]
    assert lines[0].startswith(f"error: --tree {tree}: ") and want in lines[0], lines[0]
    assert not (tmp_path / "e").exists()
