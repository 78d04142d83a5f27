"""The engine contract (spec_compiler/engine_format.py): what the compiler writes is what the
runtime reads, a graph that breaks it is refused at compile time, and the per-slot state has
every field the next features need, with the batch (slot) dimension first."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import build_engine
from spec_compiler import engine_format as fmt
from spec_compiler.config import CompileConfig, ModelConfig
from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_draft, load_target
from spec_compiler.passes.infra import outputs, set_outputs
from spec_compiler.pipeline import build_graph, check_contract
from spec_compiler.runtime import Engine
from spec_compiler.trees import resolve_tree


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_dir, tiny_draft_dir):
    return build_engine(tmp_path_factory.mktemp("fmt") / "e", tiny_dir, draft_dir=tiny_draft_dir,
                        max_seq_len=96)


def test_manifest_records_the_contract_and_the_runtime_binds_it(engine_dir):
    m = json.loads((engine_dir / fmt.MANIFEST).read_text())
    assert m["schema_version"] == fmt.SCHEMA_VERSION
    dims = fmt.Dims.from_json(m["dims"])
    assert (dims.batch, dims.max_seq_len, dims.tree_nodes, dims.tree_depth) == (1, 96, 26, 5)
    assert dims.feature_dim == dims.hidden and m["parallel"] == {"tp": 1, "lm_head": "replicated"}
    assert m["state"] == [t.to_json() for t in fmt.state(dims)]
    engine = Engine.load(engine_dir)
    assert set(engine.graphs) == set(fmt.graphs(dims)) == set(m["graphs"])
    for name, g in engine.graphs.items():
        assert g.io == fmt.graph_io(dims, name)
    for t in fmt.state(dims):  # allocated exactly as the contract says
        st = engine.state[t.name]
        assert tuple(st.shape) == t.shape and st.dtype == fmt.DTYPES[t.dtype], t.name
    # What the graphs return is what the contract names, with its shapes.
    engine.start([5, 6, 7], max_new_tokens=4)
    out = engine.call("draft")
    assert list(out) == ["tree_tokens"] and tuple(out["tree_tokens"].shape) == (1, 26)
    res = engine.call("verify", tokens=out["tree_tokens"])
    assert [(k, tuple(v.shape), fmt.dtype_name(v.dtype)) for k, v in res.items()] == \
        [(t.name, t.shape, t.dtype) for t in fmt.graph_io(dims, "verify").outputs]


def test_per_slot_state_has_what_sampling_and_batching_need():
    dims = dataclasses.replace(_dims(), batch=4, feature_dim=3 * 16)
    state = {t.name: t for t in fmt.state(dims)}
    for name in ("slot_valid", "done", "temperature", "top_p", "top_k", "seed",
                 "cache_len", "n_acc", "acc_tokens", "acc_feats", "n_out", "max_new"):
        assert state[name].shape[0] == 4, name  # one row per slot
    assert state["acc_feats"].shape == (4, dims.tree_depth + 1, 48)  # the draft's feature width
    assert fmt.graph_io(dims, "draft_prefill").inputs[1].shape == (4, dims.prefill_chunk, 48)
    # Greedy verify reads no sampling state; verify_sampled reads all of it, one value per slot.
    names = [t.name for t in fmt.graph_io(dims, "verify_sampled").inputs]
    assert names[-4:] == ["temperature", "top_p", "top_k", "seed"]
    assert not set(names[-4:]) & {t.name for t in fmt.graph_io(dims, "verify").inputs}
    assert "verify_sampled" in fmt.graphs(dims)
    assert "verify_sampled" not in fmt.graphs(dataclasses.replace(dims, sampling=False))
    assert state["temperature"].dtype == "float32" and state["slot_valid"].dtype == "bool"
    assert all(t.name.startswith(("target.", "draft.")) for t in fmt.state(dims)
               if t.name.split(".")[-1][:2] in ("k_", "v_"))


def test_a_graph_that_breaks_the_contract_is_refused(tiny_dir, tiny_draft_dir):
    target = load_target(tiny_dir)
    draft = load_draft(tiny_draft_dir, target)
    cfg = CompileConfig(model=target.cfg, draft=draft.cfg, tree=resolve_tree("chain-2"),
                        max_seq_len=64, prefill_chunk=8)
    dims = fmt.Dims.from_config(cfg)
    gm = build_graph(cfg, "verify", target, None)
    check_contract(dims, "verify", gm)  # as built: fine
    o = outputs(gm)
    set_outputs(gm, {"n_accepted" if k == "n_acc" else k: v for k, v in o.items()})
    with pytest.raises(SpecCompileError, match="verify: outputs .* differ from the engine contract"):
        check_contract(dims, "verify", gm)
    set_outputs(gm, o)
    with pytest.raises(SpecCompileError, match="prefill: inputs"):
        check_contract(dims, "prefill", gm)  # verify's inputs are not prefill's


def test_dims_from_another_layout_fail_in_one_line():
    d = _dims().to_json()
    assert fmt.Dims.from_json(d) == _dims()
    with pytest.raises(SpecCompileError, match="rebuild the engine"):
        fmt.Dims.from_json({**d, "n_slots": 8})
    with pytest.raises(SpecCompileError, match="rebuild the engine"):
        fmt.Dims.from_json({k: v for k, v in d.items() if k != "feature_dim"})


def test_capacity_rule():
    d = _dims()  # max_seq_len 64, chunk 8, depth 3: a step writes 4 slots
    assert d.step_slots == 4 and fmt.min_capacity(8, 3) == 12
    assert d.fits(10, 64 - 10 - 4) and not d.fits(10, 64 - 10 - 3)
    assert not d.fits(60, 1)  # the prompt padded to chunks (64) fits, the step after it does not
    assert not dataclasses.replace(d, max_seq_len=60).fits(57, 1)  # 57 pads to 64 > 60


def _dims() -> fmt.Dims:
    m = ModelConfig(vocab_size=128, hidden_size=16, intermediate_size=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=4)
    return fmt.Dims(batch=1, max_seq_len=64, prefill_chunk=8, tree_nodes=4, tree_depth=3,
                    vocab=m.vocab_size, hidden=16, feature_dim=16, n_layers=2, n_kv_heads=2,
                    head_dim=4, draft_layers=1, draft_kv_heads=2, draft_head_dim=4, dtype="float32",
                    sampling=True)


def test_engine_state_dtype_matches_engine(engine_dir):
    engine = Engine.load(engine_dir)
    assert engine.state["acc_feats"].dtype == torch.float32 == engine.state["target.k_0"].dtype


def test_per_bucket_trees_in_the_contract():
    """A tree per bucket: each step graph's tree tokens are its bucket's tree, the step state is
    the deepest tree's width for every bucket, a chain-0 bucket has no draft graph, and a mixed
    engine keeps the catch-up record and C spare rows in the draft's caches."""
    d = dataclasses.replace(_dims(), batch=4, tree_nodes=1, bucket_nodes=(26, 3, 1), tree_depth=5,
                            mixed=True)
    assert fmt.graph_batches(d, "draft") == (1, 2) and fmt.graph_batches(d, "verify") == (1, 2, 4)
    assert fmt.graph_batches(d, "prefill") == (1,) and not d.speculates(4) and d.speculates(2)
    for b, nodes in ((1, 26), (2, 3), (4, 1)):
        io = fmt.graph_io(fmt.graph_dims(d, "verify", b), "verify")
        assert io.inputs[0].shape == (b, nodes) and io.outputs[0].shape == (b, 6)  # acc_tokens: D + 1
    assert fmt.graph_io(fmt.graph_dims(d, "draft", 2), "draft").inputs[0].shape == (2, 6)
    st = {t.name: t.shape for t in fmt.state(d)}
    assert st["draft_len"] == (4,) and st["hist_tokens"] == (4, 64 + 6) and st["hist_feats"] == (4, 70, 16)
    assert st["draft.k_0"] == (4, 2, 64 + 8, 4) and st["target.k_0"] == (4, 2, 64, 4)
    assert "draft_len" not in {t.name for t in fmt.state(dataclasses.replace(d, mixed=False))}
    back = fmt.Dims.from_json(json.loads(json.dumps(d.to_json())))
    assert back == d
    with pytest.raises(SpecCompileError, match="bucket_nodes do not match its buckets"):
        fmt.Dims.from_json({**d.to_json(), "bucket_nodes": [26, 3]})
    with pytest.raises(SpecCompileError, match="inconsistent"):
        fmt.Dims.from_json({**d.to_json(), "bucket_nodes": [26, 3, 2]})
