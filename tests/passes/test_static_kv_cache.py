"""static_kv_cache: returned caches -> in-place index_put_ into the input buffers; same values."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import fx
from torch.testing import FileCheck

from pass_utils import (C, apply, cache_names, call, clone, config, draft_step_inputs, exact,
                        random_inputs, traced)
from spec_compiler.passes import (accept_epilogue, cleanup, fuse_projections, return_cache_rows,
                                  static_kv_cache, tree_attention, unroll_draft)
from spec_compiler.passes.infra import aten, count_ops
from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import chain

SCATTER, INDEX_PUT_ = aten.scatter.src, aten.index_put_.default


def _graph(case: str, target, draft, tree):
    """The graph static_kv_cache receives, and random inputs for it."""
    cfg = config(target, draft, tree)
    head = (cleanup, fuse_projections)
    if case == "prefill_raw":  # straight from export: SDPA reads the *new* cache value
        return traced(cfg, "prefill", target), random_inputs(cfg, "prefill", 0)
    if case == "prefill":  # tree_attention reads the *old* cache (prefix) and the new block
        gm = apply(traced(cfg, "prefill", target), *head,
                   partial(tree_attention, tree=chain(C - 1)))
        return gm, random_inputs(cfg, "prefill", 1)
    if case == "verify":  # the write is the accepted-path compaction, after the acceptance
        gm = apply(traced(cfg, "verify", target), *head, partial(tree_attention, tree=tree),
                   partial(accept_epilogue, tree=tree))
        return gm, random_inputs(cfg, "verify", 2)
    assert case == "draft"  # catch-up writes; the tree levels read the new value
    gm = apply(traced(cfg, "draft", draft), *head, partial(tree_attention, tree=None),
               partial(unroll_draft, tree=tree))
    return gm, draft_step_inputs(cfg, 3, [1, 3])


@pytest.mark.parametrize("case", ["prefill_raw", "prefill", "verify", "draft"])
def test_static_kv_cache_updates_in_place(target, draft, bushy, case):
    gm, x = _graph(case, target, draft, bushy)
    caches = cache_names(gm)
    assert set(caches) <= set(gm.meta["output_names"])
    n_writes = count_ops(gm, SCATTER)
    assert n_writes >= len(caches)
    ref = call(gm, clone(x))  # the unrewritten graph returns the new caches

    gm = apply(gm, static_kv_cache)

    assert gm.meta["output_names"] == [k for k in ref if k not in caches]  # no cache outputs
    assert gm.meta["mutated_inputs"] == caches
    assert gm.meta["pass_counts"]["static_kv_cache"] == len(caches)
    assert count_ops(gm, SCATTER) == 0 and count_ops(gm, INDEX_PUT_) == len(caches)
    FileCheck().check_not("aten.scatter.src").check("aten.index_put_.default").run(str(gm.graph))
    writes = [n.args[0] for n in gm.graph.nodes if n.target == INDEX_PUT_]
    assert all(w.op == "placeholder" for w in writes)  # into the input buffers themselves
    assert sorted(w.target for w in writes) == sorted(caches)
    args = clone(x)
    out = call(gm, args)
    assert list(out) == gm.meta["output_names"]
    for k in out:
        exact(out[k], ref[k], k)
    for k in caches:  # the caller's buffers now hold what the functional graph returned
        exact(args[k], ref[k], k)
    for k in x:
        if k not in caches:
            assert torch.equal(args[k], x[k]), f"{k} must not be mutated"


@pytest.mark.parametrize("rewrite", [static_kv_cache, return_cache_rows])
def test_static_kv_cache_requires_a_returned_cache(target, draft, bushy, rewrite):
    """(and return_cache_rows, the onnx backend's counterpart)"""
    gm, _ = _graph("prefill", target, draft, bushy)
    gm = apply(gm, rewrite)
    n = len(gm.graph.nodes)
    with pytest.raises(SpecCompileError, match=f"{rewrite.__name__}: 0 matches"):
        rewrite(gm)  # a second run: no cache is returned any more
    assert len(gm.graph.nodes) == n


def test_static_kv_cache_refuses_an_unsafe_order():
    """The old value is read after the new value's first use: no in-place order exists."""
    g = fx.Graph()
    k, idx, src = (g.placeholder(n) for n in ("k_0", "idx", "src"))
    new = g.call_function(SCATTER, (k, 2, idx, src))
    use_new = g.call_function(aten.sum.default, (new,))
    use_old = g.call_function(aten.add.Tensor, (k, use_new))
    g.output((use_old, new))
    gm = fx.GraphModule(torch.nn.Module(), g)
    gm.meta["output_names"] = ["y", "k_0"]
    with pytest.raises(SpecCompileError, match="static_kv_cache: k_0 is read at its old value"):
        static_kv_cache(gm)
