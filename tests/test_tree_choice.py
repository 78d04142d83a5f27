"""--tree auto: the tree with the most expected tokens per second on the build device, from the
draft's acceptance table (accept.json) and a cost model timed at compile time; an explicit
--tree bypasses it; the manifest records the candidates and the choice."""

from __future__ import annotations

import json
import shutil

import pytest

from spec_compiler import pipeline
from spec_compiler.cli import compile_main
from spec_compiler.errors import SpecCompileError
from spec_compiler.tree_choice import (ACCEPT, AcceptTable, AutoTree, CostModel, auto_tree, candidates,
                                       choose, draft_forwards, draft_weights_sha256, measure, monotone)
from spec_compiler.trees import TreeSpec, chain, resolve_tree

# A draft that is right 60% of the time at rank 0, 20% at rank 1 (and deeper alike).
RATES = {(0,): 0.6, (1,): 0.2, (0, 0): 0.36, (0, 1): 0.12, (1, 0): 0.12, (0, 0, 0): 0.216,
         (2,): 0.05, (0, 0, 1): 0.07, (0, 0, 0, 0): 0.13}
TABLE = AcceptTable(RATES, 1000, {})


def test_expected_tokens_per_call_from_the_table():
    assert TABLE.expected_tpc(chain(0)) == 1.0
    assert TABLE.expected_tpc(chain(2)) == pytest.approx(1 + 0.6 + 0.36)
    assert TABLE.expected_tpc(chain(6)) == pytest.approx(1 + 0.6 + 0.36 + 0.216 + 0.13)  # unseen: 0
    fitted = TABLE.fitted(4)
    assert set(fitted.paths) == {(0,), (0, 0), (0, 0, 0)} and fitted.name == "fitted-4"
    assert TABLE.fitted(99).n_nodes == len(RATES) + 1


def test_draft_forwards_follow_the_unrolled_draft():
    assert draft_forwards(chain(0)) == []
    assert draft_forwards(chain(1)) == [2]          # catch-up only: level 1 is a leaf
    assert draft_forwards(chain(3)) == [4, 1, 1]
    t = TreeSpec("t", ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    assert draft_forwards(t) == [4, 2, 1]           # level 1: (0,), (1,) have children; level 2: (0, 0)


def _cost(target, draft):
    return CostModel(dict(target), dict(draft))


def test_choice_is_the_argmax_of_expected_tokens_per_second():
    cands = candidates(TABLE, [resolve_tree("mc_sim_7b_63")])
    names = [t.name for t in cands]
    assert names[:6] == ["mc_sim_7b_63", "chain-0", "chain-1", "chain-2", "chain-3", "chain-4"]
    assert "mc_sim_7b_63" in names and len({frozenset(t.paths) for t in cands}) == len(cands)
    # A CPU-like device: a few rows cost almost nothing more than one, then cost grows with T.
    cpu = _cost({1: 30, 2: 31, 3: 32, 4: 45, 8: 55, 26: 80, 64: 150}, {1: 3, 2: 3, 4: 3.5, 8: 4})
    # A GPU-like device: flat in T (launch-bound), the draft a third of the target.
    gpu = _cost({1: 1.5, 64: 1.6}, {1: 0.5, 8: 0.5})
    picks = {}
    for name, cost in (("cpu", cpu), ("gpu", gpu)):
        tree, rows = choose(cands, TABLE, cost)
        rate = {t.name: TABLE.expected_tpc(t) / cost.step_ms(t) for t in cands}
        assert tree.name == max(rate, key=rate.get) == rows[0]["name"]
        assert [r["name"] for r in rows] == sorted(rate, key=lambda n: -rate[n])
        assert {r["name"] for r in rows} == set(names)
        best = rows[0]
        assert best["expected_tokens_per_s"] == pytest.approx(1000 * rate[tree.name], rel=1e-3)
        assert best["predicted_step_ms"] == pytest.approx(cost.step_ms(tree), rel=1e-3)
        picks[name] = tree
    assert picks["cpu"].n_nodes <= 4 < picks["gpu"].n_nodes  # small on the CPU, larger on the GPU
    # Interpolation: piecewise linear between measured sizes, the last segment extended.
    assert cpu.step_ms(chain(0)) == 30
    six = TABLE.fitted(6)  # (0,), (0, 0), (0, 0, 0), (1,), (0, 0, 0, 0): forwards [5, 1, 1, 1]
    assert draft_forwards(six) == [5, 1, 1, 1]
    assert cpu.step_ms(six) == pytest.approx((45 + 10 * 2 / 4) + (3.5 + 0.5 / 4) + 3 * 3)
    assert gpu.step_ms(chain(0)) == 1.5


def test_interference_is_taken_out_of_the_cost_model(monkeypatch):
    """Timings a busy machine disturbed: each size capped by every larger size's time (a forward
    over fewer tokens cannot cost more), a clean series left as it is; the busy note."""
    assert monotone({1: 35, 2: 36, 4: 50, 8: 64}) == {1: 35, 2: 36, 4: 50, 8: 64}
    assert monotone({1: 180, 2: 157, 3: 624, 4: 40, 8: 548, 16: 60}) == {1: 40, 2: 40, 3: 40, 4: 40,
                                                                          8: 60, 16: 60}
    logs = []
    busy = CostModel({1: 30.0}, {}, spread=3.0)
    monkeypatch.setattr("spec_compiler.tree_choice.measure", lambda *a, **k: busy)
    tree, record = AutoTree(TABLE).choose(None, None, 64, lambda d: 8, logs.append)
    assert tree.name == "chain-0" and record["cost_model"]["spread"] == 3.0
    assert any("machine was busy" in line and "--tree" in line for line in logs), logs


def test_draft_forwards_count_matches_the_built_draft_graph(tiny_dir, tiny_draft_dir, tmp_path):
    from helpers import build_engine

    tree = tmp_path / "t.json"
    t = TreeSpec("t", ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    tree.write_text(json.dumps([list(p) for p in t.paths]))
    out = build_engine(tmp_path / "e", tiny_dir, tree=str(tree), draft_dir=tiny_draft_dir, max_seq_len=64)
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["draft"]["pass_counts"]["unroll_draft"] == len(draft_forwards(t))
    assert m["tree_choice"] is None  # named explicitly: no choice made


def test_measure_times_every_size(tiny_dir, tiny_draft_dir):
    from spec_compiler.loading import load_draft, load_target

    target = load_target(tiny_dir)
    draft = load_draft(tiny_draft_dir, target)
    cost = measure(target, draft, [1, 3], [2], capacity=64, context=16, rounds=2)
    assert set(cost.target_ms) == {1, 3} and set(cost.draft_ms) == {2}
    assert all(v > 0 for v in [*cost.target_ms.values(), *cost.draft_ms.values()])
    assert cost.timing == "eager"  # the CPU runs forwards as they are


@pytest.mark.gpu
def test_measure_on_a_gpu_times_cuda_graph_replays(tiny_dir, tiny_draft_dir):
    """On a GPU the forwards are timed as CUDA-graph replays (an engine's step is one replay;
    eager forwards are launch-bound), and each replay computes what the eager forward does."""
    import torch

    from spec_compiler.loading import load_draft, load_target
    from spec_compiler.tree_choice import _forward, _graphed

    target = load_target(tiny_dir).cuda()
    draft = load_draft(tiny_draft_dir, target).cuda()
    cost = measure(target, draft, [1, 3, 16], [2], capacity=64, context=16, rounds=2)
    assert cost.timing == "cuda_graph", cost.timing
    assert set(cost.target_ms) == {1, 3, 16} and all(v > 0 for v in cost.target_ms.values())
    p = next(target.parameters())
    kv = [torch.zeros(target.cache_shape(1, 64), dtype=p.dtype, device="cuda") for _ in range(2 * len(target.layers))]
    forward, out = _forward(target, 3, 16, kv), {}

    def logits():
        out["logits"] = forward()[0]  # in a capture: the graph's output, which each replay rewrites

    with torch.inference_mode():
        want = forward()[0].clone()
        graphed, why = _graphed({"target": logits})
        assert graphed is not None, why
        out["logits"].zero_()
        graphed["target"]()
        torch.cuda.synchronize()
    torch.testing.assert_close(out["logits"], want)


def _draft_with_table(tiny_draft_dir, tmp_path, **header):
    d = tmp_path / "draft"
    shutil.copytree(tiny_draft_dir, d)
    (d / "tree.json").write_text(json.dumps([[0], [1], [0, 0]]))
    AcceptTable(RATES, 1000, {"draft_sha256": draft_weights_sha256(d), **header}).write(d / ACCEPT)
    return d


def test_compile_auto_records_candidates_and_explicit_tree_bypasses(tiny_dir, tiny_draft_dir, tmp_path):
    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    flags = ["--draft", str(draft), "--backend", "eager", "--max-seq-len", "64", "--prefill-chunk", "8",
             "--dispatch", "predicted"]  # the cost model's choice as it is (measured: below)
    assert compile_main([str(tiny_dir), "--out", str(tmp_path / "auto"), *flags]) == 0
    m = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    ch = m["tree_choice"]
    assert ch["method"] == "auto" and ch["accept_table"].endswith(ACCEPT)
    assert list(ch["buckets"]) == ["1"] and ch["buckets"]["1"]["batch"] == 1
    rows = ch["buckets"]["1"]["candidates"]
    assert ch["choice"] == {"1": rows[0]["name"]} and ch["buckets"]["1"]["choice"] == rows[0]["name"]
    assert rows[0]["name"] == m["tree"]["name"] == m["bucket_trees"]["1"]["name"]
    assert rows[0]["expected_tokens_per_s"] == max(r["expected_tokens_per_s"] for r in rows)
    assert sorted(map(tuple, rows[0]["paths"])) == sorted(map(tuple, m["tree"]["paths"]))
    assert {"chain-0", "chain-1", "tree"} <= {r["name"] for r in rows}  # tree: the draft's tree.json
    for r in rows:
        t = TreeSpec(r["name"], tuple(map(tuple, r["paths"])))
        assert r["expected_tokens_per_call"] == pytest.approx(TABLE.expected_tpc(t), abs=1e-4)
        cm = ch["buckets"]["1"]["cost_model"]
        assert r["predicted_step_ms"] == pytest.approx(
            CostModel({int(k): v for k, v in cm["target_ms"].items()},
                      {int(k): v for k, v in cm["draft_ms"].items()}).step_ms(t), rel=1e-2)
    assert set(m["graphs"]) == ({"prefill", "verify", "verify_sampled"} if m["tree"]["name"] == "chain-0"
                                else {"prefill", "verify", "verify_sampled", "draft_prefill", "draft"})

    assert compile_main([str(tiny_dir), "--out", str(tmp_path / "named"), "--tree", "chain-2", *flags]) == 0
    m = json.loads((tmp_path / "named" / "manifest.json").read_text())
    assert m["tree"]["name"] == "chain-2" and m["tree_choice"] is None


def test_auto_without_a_usable_table_falls_back(tiny_draft_dir, tmp_path, capsys):
    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    tree, chooser = auto_tree(draft)
    assert chooser is not None and tree.name == "tree" and chooser.extra == (tree,)
    (draft / ACCEPT).write_text(json.dumps({**json.loads((draft / ACCEPT).read_text()),
                                            "draft_sha256": "0" * 64}))
    tree, chooser = auto_tree(draft, lambda s: print(s))
    assert chooser is None and tree.name == "tree"  # other weights' table: ignored, tree.json
    assert "other draft weights" in capsys.readouterr().out
    (draft / ACCEPT).unlink()
    assert auto_tree(draft)[1] is None
    (draft / "tree.json").unlink()
    assert auto_tree(draft)[0].name == "mc_sim_7b_63" and auto_tree(None)[0].name == "mc_sim_7b_63"
    (draft / ACCEPT).write_text("{not json")
    with pytest.raises(SpecCompileError, match="accept.json.*unreadable"):
        auto_tree(draft)
    (draft / ACCEPT).write_text(json.dumps({"format": "spec-accept/1", "n_starts": 3,
                                            "paths": [[[0], 1.5]]}))
    with pytest.raises(SpecCompileError, match="corrupt"):
        auto_tree(draft)


def test_auto_picks_a_tree_per_bucket(tiny_dir, tiny_draft_dir, tmp_path, monkeypatch):
    """--tree auto --max-batch 2: the cost model is measured at each bucket's batch; where the
    step time grows with the tree's size (as a compute-bound GPU at a large batch does) bushy
    trees stop paying and chain-0 wins: that bucket decodes plainly, with no draft graph. The
    manifest records each bucket's candidates and choice; the engine stays greedy-exact."""
    from helpers import hf_greedy
    from spec_compiler.runtime import Engine

    batches = []

    def fake_measure(target, draft, target_sizes, draft_sizes, capacity, context, rounds=7, batch=1):
        batches.append(batch)  # batch 1: weights-bound (flat in T); batch 2: compute-bound
        return CostModel({T: 10.0 if batch == 1 else 5.0 + 20.0 * T for T in target_sizes},
                         {n: 1.0 for n in draft_sizes})

    monkeypatch.setattr("spec_compiler.tree_choice.measure", fake_measure)
    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    out = tmp_path / "auto"
    assert compile_main([str(tiny_dir), "--out", str(out), "--draft", str(draft), "--backend", "eager",
                         "--max-seq-len", "64", "--prefill-chunk", "8", "--max-batch", "2",
                         "--dispatch", "predicted"]) == 0
    assert batches == [1, 2]
    m = json.loads((out / "manifest.json").read_text())
    per = m["tree_choice"]["buckets"]
    for b in ("1", "2"):  # each bucket's choice is its own argmax, and what the engine builds
        rows = per[b]["candidates"]
        assert per[b]["choice"] == rows[0]["name"] == m["bucket_trees"][b]["name"]
        assert rows[0]["expected_tokens_per_s"] == max(r["expected_tokens_per_s"] for r in rows)
        assert {"chain-0", "chain-1"} <= {r["name"] for r in rows}
    assert per["1"]["choice"] != "chain-0" and per["2"]["choice"] == "chain-0"
    assert m["dims"]["bucket_nodes"][1] == 1 and m["dims"]["mixed"]
    assert m["graphs"]["draft"]["batch"] == 1 and "buckets" not in m["graphs"]["draft"]
    engine = Engine.load(out)
    prompts = [[5, 9, 17, 3], [40, 2 + 1, 77, 12, 90, 33, 8, 1, 64], [100, 4]]
    res = engine.generate_batch(prompts, max_new_tokens=[20, 12, 16])
    for p, r, n in zip(prompts, res, [20, 12, 16]):
        assert r.output_ids == hf_greedy(tiny_dir, p, n), p


@pytest.mark.parametrize("plain_ms", [{1: 10.0, 2: 0.1}, {1: 10.0, 2: 10.0}, {1: 0.1, 2: 0.1}],
                         ids=["bucket-2-plain", "both-speculate", "both-plain"])
def test_measured_dispatch_keeps_a_tree_only_where_the_compiled_step_pays(tiny_dir, tiny_draft_dir, tmp_path,
                                                                          monkeypatch, plain_ms):
    """--tree auto (measured dispatch, the default): every speculating bucket is also built with
    plain decoding, both compiled steps are timed there, and a bucket keeps its tree only if
    expected tokens per call / its step time beats 1 / the plain step time. The manifest records
    the timings and the final choice, the losers' artifacts are gone, and the engine, whatever
    mix of buckets it ends with, stays greedy-exact across plain and speculative steps."""
    from helpers import hf_greedy
    from spec_compiler.runtime import Engine

    def fake_measure(target, draft, target_sizes, draft_sizes, capacity, context, rounds=7, batch=1):
        return CostModel({T: 10.0 for T in target_sizes}, {n: 1.0 for n in draft_sizes})  # trees look free

    timed = []

    def fake_step(engine, b):  # a speculative view at 1 ms a step; the plain one as parametrized
        timed.append((engine.dims.bucket_nodes[b - 1], b))  # buckets 1, 2: the view's tree size there
        return 1.0 if engine.dims.speculates(b) else plain_ms[b]

    monkeypatch.setattr("spec_compiler.tree_choice.measure", fake_measure)
    monkeypatch.setattr("spec_compiler.pipeline.step_ms", fake_step)
    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    out, logs = tmp_path / "auto", []
    assert compile_main([str(tiny_dir), "--out", str(out), "--draft", str(draft), "--backend", "eager",
                         "--max-seq-len", "64", "--prefill-chunk", "8", "--max-batch", "2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    per = m["tree_choice"]["buckets"]

    def nodes(b, name):
        return next(r["nodes"] for r in per[str(b)]["candidates"] if r["name"] == name)

    # each bucket timed plain, with its tree, and with its smaller alternative tree where it had one
    assert sorted(timed) == sorted((n, b) for b in (1, 2) for n in (
        1, nodes(b, per[str(b)]["choice"]),
        *([nodes(b, per[str(b)]["measured_alternate"])] if "measured_alternate" in per[str(b)] else [])))
    keep = {}
    for b in (1, 2):
        got = per[str(b)]["measured"]
        tpc = got["expected_tokens_per_call"]
        assert tpc > 1 and got["speculative_step_ms"] == 1.0 and got["plain_step_ms"] == plain_ms[b]
        keep[b] = tpc / 1.0 > 1 / plain_ms[b]
        assert got["speculate"] == keep[b]
        if "measured_alternate" in per[str(b)]:  # as fast a step, fewer tokens per call: it loses
            alt = got["alternate"]
            assert alt["tree"] == per[str(b)]["measured_alternate"] and alt["step_ms"] == 1.0
            assert alt["expected_tokens_per_call"] < tpc
        assert got["chosen"] == (per[str(b)]["choice"] if keep[b] else "chain-0")
        want = per[str(b)]["choice"] if keep[b] else "chain-0"
        assert "measured_candidate" not in per[str(b)]  # the cost model speculated at both buckets
        assert m["bucket_trees"][str(b)]["name"] == m["tree_choice"]["choice"][str(b)] == want
        assert (m["dims"]["bucket_nodes"][b - 1] > 1) == keep[b]
    files = {p.name for p in out.iterdir()}
    assert ("verify.plain.pt2" in files) == (not keep[1]) and ("verify.plain.b2.pt2" in files) == (not keep[2])
    assert ("verify.pt2" in files) == keep[1] and ("verify.b2.pt2" in files) == keep[2]
    assert ("draft.b2.pt2" in files) == keep[2]
    assert ("draft" in m["graphs"]) == any(keep.values()) and m["dims"]["mixed"]
    referenced = {e["file"] for g in m["graphs"].values() for e in [g, *g.get("buckets", {}).values()]}
    assert {f for f in files if f.endswith(".pt2")} == referenced  # nothing left over, nothing missing
    engine = Engine.load(out)
    prompts = [[5, 9, 17, 3], [40, 3, 77, 12, 90, 33, 8, 1, 64], [100, 4]]
    res = engine.generate_batch(prompts, max_new_tokens=[20, 12, 16])  # buckets 2, then 1 as they end
    for p, r, n in zip(prompts, res, [20, 12, 16]):
        assert r.output_ids == hf_greedy(tiny_dir, p, n), p


@pytest.mark.parametrize("plain_ms", [5.0, 0.1], ids=["speculation-pays", "plain-pays"])
def test_measured_dispatch_also_decides_where_the_cost_model_chose_plain(tiny_dir, tiny_draft_dir, tmp_path,
                                                                       monkeypatch, plain_ms):
    """The cost model chooses chain-0 at bucket 2 (its predicted step grows with the tree) and a
    tree at bucket 1: bucket 2 is built with its best speculative candidate anyway, beside the
    plain alternate, and the compiled steps decide there as everywhere. The record keeps the cost
    model's choice and names the candidate measured; the engine stays greedy-exact."""
    from helpers import hf_greedy
    from spec_compiler.runtime import Engine

    def fake_measure(target, draft, target_sizes, draft_sizes, capacity, context, rounds=7, batch=1):
        return CostModel({T: 10.0 if batch == 1 else 5.0 + 20.0 * T for T in target_sizes},
                         {n: 1.0 for n in draft_sizes})

    def fake_step(engine, b):  # the compiled speculative step: 1 ms; plain as parametrized
        return 1.0 if engine.dims.speculates(b) else plain_ms

    monkeypatch.setattr("spec_compiler.tree_choice.measure", fake_measure)
    monkeypatch.setattr("spec_compiler.pipeline.step_ms", fake_step)
    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    out = tmp_path / "auto"
    assert compile_main([str(tiny_dir), "--out", str(out), "--draft", str(draft), "--backend", "eager",
                         "--max-seq-len", "64", "--prefill-chunk", "8", "--max-batch", "2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    rec = m["tree_choice"]["buckets"]["2"]
    assert rec["choice"] == "chain-0"  # the cost model's
    best = next(r for r in rec["candidates"] if r["nodes"] > 1)
    assert rec["measured_candidate"] == best["name"] == rec["measured"]["tree"]
    keep = best["expected_tokens_per_call"] / 1.0 > 1 / plain_ms
    assert rec["measured"]["speculate"] == keep
    built = best["name"] if keep else "chain-0"
    assert m["bucket_trees"]["2"]["name"] == m["tree_choice"]["choice"]["2"] == built
    assert ("draft.b2.pt2" in {p.name for p in out.iterdir()}) == keep
    engine = Engine.load(out)
    prompts = [[5, 9, 17, 3], [40, 3, 77, 12, 90, 33, 8, 1, 64], [100, 4]]
    res = engine.generate_batch(prompts, max_new_tokens=[20, 12, 16])
    for p, r, n in zip(prompts, res, [20, 12, 16]):
        assert r.output_ids == hf_greedy(tiny_dir, p, n), p


def test_measured_trees_leave_an_all_plain_choice_plain():
    """No bucket speculates by the cost model: no draft is built just to measure."""
    from spec_compiler.pipeline import measured_trees

    rec = {"choice": "chain-0", "candidates": [{"name": "chain-0", "nodes": 1, "paths": []},
                                               {"name": "chain-1", "nodes": 2, "paths": [[0]]}]}
    choice = {"buckets": {"1": rec, "2": dict(rec)}}
    assert measured_trees((chain(0), chain(0)), choice) == (chain(0), chain(0))
    assert "measured_candidate" not in rec
    got = measured_trees((chain(1), chain(0)), choice)
    assert got == (chain(1), chain(1)) and choice["buckets"]["2"]["measured_candidate"] == "chain-1"


def _cand(name, nodes, depth, tps):
    return {"name": name, "nodes": nodes, "depth": depth, "expected_tokens_per_s": tps,
            "paths": [[0] * (i + 1) for i in range(depth)] + [[k] for k in range(1, nodes - depth)]}


def test_tree_alternates_pick_the_best_smaller_tree_of_the_same_depth_within_the_margin():
    """The smaller tree measured dispatch also builds: the cost model's best-predicted candidate
    with fewer nodes and the same depth, only within ALTERNATE_MARGIN of the bucket's tree; none
    at a plain bucket, none when nothing qualifies."""
    from spec_compiler.pipeline import ALTERNATE_MARGIN, tree_alternates

    big = _cand("fitted-9", 9, 3, 100.0)
    cands = [big, _cand("fitted-7", 7, 3, 100.0 * (1 - ALTERNATE_MARGIN) + 0.5),  # within: the one
             _cand("fitted-5", 5, 3, 90.0),  # smaller, slower
             _cand("deeper-8", 8, 4, 99.9), _cand("shallow-6", 6, 2, 99.9),  # another depth: never
             _cand("bigger-12", 12, 3, 99.0), _cand("chain-0", 1, 0, 50.0)]
    t = TreeSpec.from_json(big)
    assert t.n_nodes == 9 and t.max_depth == 3
    choice = {"buckets": {"1": {"candidates": cands}, "2": {"candidates": cands}}}
    got = tree_alternates((t, chain(0)), choice)
    assert got[0].name == "fitted-7" and got[0].n_nodes == 7 and got[1] is None
    assert choice["buckets"]["1"]["measured_alternate"] == "fitted-7"
    assert "measured_alternate" not in choice["buckets"]["2"]
    far = [big, _cand("fitted-7", 7, 3, 100.0 * (1 - ALTERNATE_MARGIN) - 0.5)]
    assert tree_alternates((t,), {"buckets": {"1": {"candidates": far}}}) is None


@pytest.mark.parametrize("max_batch", [1, 2])
def test_measured_dispatch_takes_the_smaller_tree_where_its_compiled_step_wins(
        tiny_dir, tiny_draft_dir, tmp_path, monkeypatch, max_batch):
    """Where the compiled steps show the smaller alternative tree faster in tokens per ms (here at
    bucket 1; at bucket 2 its step is as slow as the cost model's tree's), the bucket takes it:
    its draft and verify graphs replace the cost model's tree's (whose artifacts are deleted, as
    are the plain ones), the manifest's trees, dims and record say so, a bucket where it loses
    keeps its own tree, and the engine, its buckets on different trees, stays greedy-exact."""
    from helpers import hf_greedy
    from spec_compiler.runtime import Engine

    def fake_measure(target, draft, target_sizes, draft_sizes, capacity, context, rounds=7, batch=1):
        return CostModel({T: 10.0 for T in target_sizes}, {n: 1.0 for n in draft_sizes})  # trees look free

    monkeypatch.setattr("spec_compiler.pipeline.ALTERNATE_MARGIN", 1.0)  # any smaller tree of its depth
    monkeypatch.setattr("spec_compiler.tree_choice.measure", fake_measure)
    alt_nodes = []

    def fake_step(engine, b):  # plain 10 ms, the cost model's tree 1 ms, the alternative 0.1 ms at bucket 1
        n = engine.dims.bucket_nodes[b - 1]
        return 10.0 if n == 1 else 0.1 if n in alt_nodes and b == 1 else 1.0

    monkeypatch.setattr("spec_compiler.pipeline.step_ms", fake_step)
    real = pipeline.tree_alternates

    def spy(trees, choice, progress=lambda s: None):
        got = real(trees, choice, progress)
        alt_nodes.extend(t.n_nodes for t in got or () if t is not None)
        return got

    monkeypatch.setattr("spec_compiler.pipeline.tree_alternates", spy)
    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    out = tmp_path / "auto"
    assert compile_main([str(tiny_dir), "--out", str(out), "--draft", str(draft), "--backend", "eager",
                         "--max-seq-len", "64", "--prefill-chunk", "8", "--max-batch", str(max_batch)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    files = {p.name for p in out.iterdir() if p.suffix == ".pt2"}
    assert len(alt_nodes) == max_batch  # the same choice at every bucket: an alternative at each
    for b in range(1, max_batch + 1):
        rec = m["tree_choice"]["buckets"][str(b)]
        alt, own = rec["measured_alternate"], rec["choice"]  # the cost model's choice stays recorded
        assert alt != own
        got = rec["measured"]
        assert got["tree"] == own and got["alternate"]["tree"] == alt and got["speculate"]
        assert got["alternate"]["step_ms"] == (0.1 if b == 1 else 1.0)
        won = alt if b == 1 else own
        assert got["chosen"] == m["tree_choice"]["choice"][str(b)] == m["bucket_trees"][str(b)]["name"] == won
        nodes = next(r["nodes"] for r in rec["candidates"] if r["name"] == won)
        assert m["dims"]["bucket_nodes"][b - 1] == nodes
        suffix = "" if b == 1 else f".b{b}"
        ours = {f"{g}{suffix}.pt2" for g in ("draft", "verify", "verify_sampled")}
        theirs = {f"{g}.alt{suffix}.pt2" for g in ("draft", "verify", "verify_sampled")}
        assert (theirs if b == 1 else ours) <= files
        assert not files & (ours if b == 1 else theirs) and f"verify.plain{suffix}.pt2" not in files
    assert m["dims"]["tree_nodes"] == m["dims"]["bucket_nodes"][-1]
    referenced = {e["file"] for g in m["graphs"].values() for e in [g, *g.get("buckets", {}).values()]}
    assert files == referenced  # nothing left over, nothing missing
    engine = Engine.load(out)
    assert engine.spec.bucket_trees[1].name == m["tree_choice"]["buckets"]["1"]["measured_alternate"]
    prompts = [[5, 9, 17, 3], [40, 3, 77, 12, 90, 33, 8, 1, 64], [100, 4]]
    res = engine.generate_batch(prompts, max_new_tokens=[20, 12, 16])  # bucket 2 (if any), then 1
    for p, r, n in zip(prompts, res, [20, 12, 16]):
        assert r.output_ids == hf_greedy(tiny_dir, p, n), p


def test_measured_dispatch_times_real_steps(tiny_dir, tiny_draft_dir, tmp_path):
    """The same with the real timing (`pipeline.step_ms`: synthetic slots, median of timed
    steps), whichever way it decides on this machine: positive step times, a consistent engine,
    greedy-exact output."""
    from helpers import hf_greedy
    from spec_compiler.runtime import Engine

    draft = _draft_with_table(tiny_draft_dir, tmp_path)
    out = tmp_path / "auto"
    assert compile_main([str(tiny_dir), "--out", str(out), "--draft", str(draft), "--backend", "eager",
                         "--max-seq-len", "64", "--prefill-chunk", "8", "--max-batch", "2", "--no-sampling"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    per = m["tree_choice"]["buckets"]
    for b, rec in per.items():
        if all(r["choice"] == "chain-0" for r in per.values()):  # plain by the cost model: no draft to time
            assert "measured" not in rec and "draft" not in m["graphs"]
            continue
        got = rec["measured"]  # every bucket, even one where the cost model chose chain-0
        assert got["tree"] == rec.get("measured_candidate", rec["choice"]) != "chain-0"
        assert got["speculative_step_ms"] > 0 and got["plain_step_ms"] > 0
        assert got["speculate"] == (m["bucket_trees"][b]["name"] != "chain-0")
    referenced = {e["file"] for g in m["graphs"].values() for e in [g, *g.get("buckets", {}).values()]}
    assert {p.name for p in out.iterdir() if p.suffix == ".pt2"} == referenced
    engine = Engine.load(out)
    res = engine.generate_batch([[5, 9, 17, 3], [100, 4]], max_new_tokens=12)
    for p, r in zip([[5, 9, 17, 3], [100, 4]], res):
        assert r.output_ids == hf_greedy(tiny_dir, p, 12), p
