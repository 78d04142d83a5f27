"""The onnx backend end to end: the step graphs exported with torch.onnx and run with ONNX Runtime.

Greedy tokens must equal transformers' and an Inductor engine's; sampled tokens must replay an
eager engine's for the same seed (the same counter-based draws, exported as standard operators)
and be distributed as the target's. Every exported graph passes onnx.checker, has no
custom-domain node and static shapes, and holds no weights (they stay in weights.safetensors).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import (OracleDraft, build_engine, check_first_two_tokens, expected_emitted, hf_greedy,
                     make_random_draft)
from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_draft, load_target
from spec_compiler.ops.tree_attention import tree_attention_reference
from spec_compiler.runtime import Engine
from spec_compiler.trees import resolve_tree
from test_cli import ENV, REPO, assert_clean_error, no_leftovers, run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PROMPT = [17, 45, 3, 99, 12, 7, 88, 23, 64, 31, 5]
RANK_OF, POISONED = (lambda p: (p // 2) % 2), (lambda p: p % 9 in (0, 4))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir, tiny_dirs, tiny_draft_dir):
    """onnx: the 26-node tree with the oracle draft at 2 slots (sampling too), and chain-2 with
    a random draft on the tied-embedding checkpoint (its embedding is its lm_head: one weight);
    the same chain-2 engine with Inductor, and the tree with eager (whose sampled tokens the
    onnx engine must replay)."""
    root = tmp_path_factory.mktemp("onnx")
    tied = tiny_dirs["mha_tied"]
    seq = PROMPT + hf_greedy(tiny_dir, PROMPT, 200, eos=[])

    def oracle():
        return OracleDraft(load_draft(tiny_draft_dir, load_target(tiny_dir)), seq, 128, 128, RANK_OF, POISONED)

    tree = dict(tree="mc_sim_7b_63", draft_dir=tiny_draft_dir, max_seq_len=128, max_batch=2)
    chain = dict(tree="chain-2", draft_dir=make_random_draft(root / "d", tied), max_seq_len=128, sampling=False)
    engines = {"tree": build_engine(root / "tree", tiny_dir, backend="onnx", draft_module=oracle(), **tree),
               "tree_eager": build_engine(root / "te", tiny_dir, backend="eager", draft_module=oracle(), **tree),
               "chain": build_engine(root / "chain", tied, backend="onnx", **chain),
               "chain_inductor": build_engine(root / "ci", tied, backend="inductor", jobs=1, **chain)}
    return engines, seq


@pytest.fixture(scope="module")
def loaded(built):
    return {k: Engine.load(v) for k, v in built[0].items()}


def test_onnx_greedy_matches_transformers_and_inductor(built, loaded, tiny_dir, tiny_dirs):
    _, seq = built
    for p in (PROMPT, [9] * 20):
        assert loaded["tree"].spec.backend == loaded["chain"].spec.backend == "onnx"
        assert loaded["tree"].generate(p, max_new_tokens=50).output_ids == hf_greedy(tiny_dir, p, 50)
        ref = hf_greedy(tiny_dirs["mha_tied"], p, 50)
        assert loaded["chain"].generate(p, max_new_tokens=50).output_ids == ref
        assert loaded["chain_inductor"].generate(p, max_new_tokens=50).output_ids == ref
    # The oracle: acceptance and compaction of a path that is not the first, in the ONNX graphs.
    res = loaded["tree"].generate(PROMPT, max_new_tokens=60)
    assert res.output_ids == seq[len(PROMPT):len(PROMPT) + 60]
    exp = expected_emitted(resolve_tree("mc_sim_7b_63"), len(PROMPT), res.verify_calls, RANK_OF, POISONED)
    assert res.accept_lengths[:-1] == exp[:-1] and res.tokens_per_call > 2.0


def test_onnx_batch_matches_transformers(loaded, tiny_dir):
    prompts = [PROMPT, [9] * 20, PROMPT[3:], [4, 8, 15, 16, 23, 42]]
    res = loaded["tree"].generate_batch(prompts, max_new_tokens=[40, 30, 45, 20])
    assert [r.output_ids for r in res] == [hf_greedy(tiny_dir, p, n) for p, n in zip(prompts, [40, 30, 45, 20])]


def test_onnx_sampling_replays_eager_and_is_the_target_distribution(loaded, tiny_dir):
    onnx_e, eager = loaded["tree"], loaded["tree_eager"]
    for seed in range(4):
        for kw in (dict(temperature=0.8), dict(temperature=1.0, top_p=0.9, top_k=20)):
            a = onnx_e.generate(PROMPT, max_new_tokens=30, seed=seed, **kw)
            assert a.output_ids == eager.generate(PROMPT, max_new_tokens=30, seed=seed, **kw).output_ids
    batch = onnx_e.generate_batch([PROMPT, PROMPT[:5]], max_new_tokens=20, temperature=1.0, seed=7)
    assert [r.output_ids for r in batch] == [eager.generate(p, max_new_tokens=20, temperature=1.0, seed=s).output_ids
                                             for p, s in ((PROMPT, 7), (PROMPT[:5], 8))]
    check_first_two_tokens(onnx_e, tiny_dir, [5, 9, 33, 2, 71, 8], 300)


def test_onnx_graphs_are_standard_static_and_hold_no_weights(built):
    import onnx

    for kind in ("tree", "chain"):
        path = built[0][kind]
        m = json.loads((path / "manifest.json").read_text())
        assert m["backend"] == "onnx"
        files = [e["file"] for g in m["graphs"].values() for e in (g, *g.get("buckets", {}).values())]
        assert len(files) == (8 if kind == "tree" else 4) and all(f.endswith(".onnx") for f in files)
        weights = (path / "weights.safetensors").stat().st_size
        for f in files:
            model = onnx.load(str(path / f))
            onnx.checker.check_model(model, full_check=True)
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, f
            assert not any(n.op_type == "tree_attention" for n in model.graph.node)
            for v in (*model.graph.input, *model.graph.output):
                assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), (f, v.name)
            inits = sum(len(t.raw_data) for t in model.graph.initializer)
            if kind == "chain":  # (the oracle draft's lookup table is a constant of its graphs)
                assert inits < weights / 20, (f, inits, weights)  # tree tables, not weights
        for name, g in m["graphs"].items():
            assert "return_cache_rows" in g["passes"] and "static_kv_cache" not in g["passes"]
            assert g["pass_counts"]["return_cache_rows"] == len(g["cache_writes"]) > 0, name


@pytest.mark.parametrize("B, Hq, Hkv, T, lens", [(1, 4, 4, 1, [0]), (2, 4, 2, 5, [3, 11]),
                                                 (2, 6, 2, 4, [16, 0])])
def test_tree_attention_translation_matches_reference(B, Hq, Hkv, T, lens):
    """`spec::tree_attention` exported through the translation table and run by ONNX Runtime
    against the plain-torch reference, random inputs and a random ancestor mask."""
    import onnxruntime as ort

    from spec_compiler.export.onnx_export import translation_table

    class Attend(torch.nn.Module):
        def forward(self, *xs):
            return torch.ops.spec.tree_attention(*xs, 0.3)

    g = torch.Generator().manual_seed(T)
    S, Dh = 16, 8
    mask = (torch.rand(T, T, generator=g) < 0.5).tril() | torch.eye(T, dtype=torch.bool)
    args = (torch.randn(B, Hq, T, Dh, generator=g), *(torch.randn(B, Hkv, n, Dh, generator=g) for n in (S, S, T, T)),
            torch.tensor(lens), mask)
    prog = torch.onnx.export(Attend().eval(), args, dynamo=True, opset_version=18, verbose=False,
                             custom_translation_table=translation_table())
    assert {n.domain for n in prog.model_proto.graph.node} <= {"", "ai.onnx"}
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
    torch.testing.assert_close(torch.from_numpy(out), tree_attention_reference(*args, 0.3), atol=1e-5, rtol=1e-5)


def test_spec_run_onnx_engine(built, loaded):
    r = run(built[0]["tree"], "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "20",
            "--json", "--temperature", "0.9", "--seed", "3")
    assert r.returncode == 0, r.stderr
    want = loaded["tree"].generate(PROMPT, max_new_tokens=20, temperature=0.9, seed=3).output_ids
    assert json.loads(r.stdout)["output_ids"] == want


BLOCK_ORT = "import sys; sys.modules['onnxruntime'] = None; "  # `import onnxruntime` then fails


def test_missing_onnxruntime_is_one_clear_line(built, monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SpecCompileError, match=r"onnxruntime.*pip install \.\[onnx\]"):
        Engine.load(built[0]["chain"])

    def cli(entry, *args):
        code = BLOCK_ORT + f"from spec_compiler.cli import {entry}; sys.exit({entry}(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                              text=True, env=ENV, timeout=300, cwd=REPO)

    assert_clean_error(cli("run_main", built[0]["chain"], "--prompt-ids", "1,2,3"), "onnxruntime",
                       "pip install .[onnx]")
    out = tmp_path / "e"
    assert_clean_error(cli("compile_main", tiny_dir, "--out", out, "--tree", "chain-0", "--backend", "onnx"),
                       "onnxruntime", "pip install .[onnx]")
    no_leftovers(out)


def test_onnx_refuses_bfloat16(tiny_dir):
    from spec_compiler.config import CompileConfig, ModelConfig
    from spec_compiler.export.onnx_export import check_onnx

    cfg = CompileConfig(model=ModelConfig.from_hf(tiny_dir), draft=None, tree=resolve_tree("chain-0"),
                        backend="onnx", dtype="bfloat16")
    with pytest.raises(SpecCompileError, match="--backend onnx --dtype bfloat16.*pass --dtype float32"):
        check_onnx(cfg)


def test_decode_graphs_run_with_prepacked_weights_and_the_same_tokens(built, loaded, monkeypatch):
    """On the CPU the decode graphs' weights are session constants (ONNX Runtime prepacks them),
    started at their first call; prefill binds them as inputs. A machine whose memory would not
    hold the packed copies binds every weight, and the tokens are the same either way."""
    from spec_compiler.runtime import onnx_runtime

    fresh = Engine.load(built[0]["tree"])
    graphs = [g for bucket in fresh._bucket_graphs.values() for g in bucket.values()]
    assert all((g.fn.session is None) == (g.name in onnx_runtime.PREPACKED) for g in graphs)
    fresh.generate(PROMPT, max_new_tokens=8)
    used = [g for g in graphs if g.fn.session is not None]
    assert {g.name for g in used} >= {"prefill", "verify", "draft"}
    assert all(bool(g.fn.constant) == (g.name in onnx_runtime.PREPACKED) for g in used)
    assert not any(g.name == "verify_sampled" for g in used)  # greedy: its packed copy never made

    monkeypatch.setattr(onnx_runtime, "prepack_fits", lambda nbytes, sessions: False)
    plain = Engine.load(built[0]["tree"])
    assert all(g.fn.weights is None for bucket in plain._bucket_graphs.values() for g in bucket.values())
    for p in (PROMPT, [9] * 20):
        assert plain.generate(p, max_new_tokens=40).output_ids == fresh.generate(p, max_new_tokens=40).output_ids
    batch = [PROMPT, [9] * 20]
    assert [r.output_ids for r in plain.generate_batch(batch, max_new_tokens=20, temperature=1.0, seed=3)] == \
        [r.output_ids for r in fresh.generate_batch(batch, max_new_tokens=20, temperature=1.0, seed=3)]


def test_prepack_only_where_the_packed_copies_fit(monkeypatch):
    from spec_compiler.runtime import onnx_runtime

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (16 << 30) // 4096}  # 16 GiB
    monkeypatch.setattr(onnx_runtime.os, "sysconf", lambda k: pages[k])
    assert onnx_runtime.prepack_fits(1 << 30, 4)  # the copies take a quarter: fits
    assert not onnx_runtime.prepack_fits((1 << 30) + (1 << 20), 4)
    assert not onnx_runtime.prepack_fits(1 << 30, 5)  # one more bucket's session: not


def test_prepack_counts_every_bucket_session(built, monkeypatch):
    """The tree engine has batch buckets 1 and 2: its decode graphs are six sessions."""
    from spec_compiler.runtime import onnx_runtime

    seen = []
    monkeypatch.setattr(onnx_runtime, "prepack_fits", lambda nbytes, sessions: seen.append(sessions) or True)
    eng = Engine.load(built[0]["tree"])
    assert seen == [2 * len(onnx_runtime.PREPACKED)] and sorted(eng._bucket_graphs) == [1, 2]
