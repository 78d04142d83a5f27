"""cleanup: export noise (_assert_tensor_metadata, same-dtype `to`) removed; values unchanged."""

from __future__ import annotations

import torch
from torch.testing import FileCheck

from pass_utils import close, exact, apply, call, config, eager, random_inputs, traced
from spec_compiler.passes import cleanup
from spec_compiler.passes.infra import aten, count_ops
from spec_compiler.trace import trace
from spec_compiler.trees import chain

ASSERT, TO = aten._assert_tensor_metadata.default, aten.to.dtype


def _same_dtype_casts(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == TO
               and n.args[0].meta["val"].dtype == n.args[1])


def test_cleanup_removes_noise_and_matches_unrewritten(target, draft):
    cfg = config(target, draft, chain(4))
    ref_gm = traced(cfg, "prefill", target)
    gm = traced(cfg, "prefill", target)
    n_assert, n_cast, n_to = count_ops(gm, ASSERT), _same_dtype_casts(gm), count_ops(gm, TO)
    assert n_assert > 0 and n_cast > 0, "the export has no noise: this test would prove nothing"
    n_nodes = len(gm.graph.nodes)

    gm = apply(gm, cleanup)

    assert count_ops(gm, ASSERT) == 0 and _same_dtype_casts(gm) == 0
    assert count_ops(gm, TO) == n_to - n_cast >= 1  # real casts (input_pos int64 -> float32) stay
    assert len(gm.graph.nodes) == n_nodes - n_assert - n_cast
    assert gm.meta["pass_counts"]["cleanup"] == n_assert + n_cast
    FileCheck().check_not("_assert_tensor_metadata").run(str(gm.graph))
    for seed in (0, 1):
        x = random_inputs(cfg, "prefill", seed)
        out, ref = call(gm, x), call(ref_gm, x)
        assert out.keys() == ref.keys()
        for k in ref:
            exact(out[k], ref[k], k)
        logits, hidden, kv = eager(target, x["tokens"], x["input_pos"], x["cache_len"],
                                   [x[k] for k in ref if k[:2] in ("k_", "v_")])
        close(out["logits"], logits)
        close(out["hidden"], hidden)


def test_cleanup_noop_and_idempotent(target, draft):
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    gm = trace(lin, (torch.randn(2, 8),), ["x"], ["y"])
    n = len(gm.graph.nodes)
    assert cleanup(gm) is gm and len(gm.graph.nodes) == n
    assert gm.meta["pass_counts"]["cleanup"] == 0

    gm = apply(traced(config(target, draft, chain(4)), "draft", draft), cleanup)
    code, n = gm.code, len(gm.graph.nodes)
    assert cleanup(gm) is gm
    assert len(gm.graph.nodes) == n and gm.code == code  # a second run changes nothing
