"""return_cache_rows: returned caches -> the written rows and their slots; writing those rows into
the input caches (what the onnx runtime does) gives the caches the functional graph returned."""

from __future__ import annotations

import pytest
import torch

from pass_utils import apply, call, clone, exact
from spec_compiler.passes import return_cache_rows
from spec_compiler.runtime.onnx_runtime import write_rows
from test_static_kv_cache import _graph


@pytest.mark.parametrize("case", ["prefill_raw", "prefill", "verify", "draft"])
def test_return_cache_rows_writes_what_the_graph_returned(target, draft, bushy, case):
    gm, x = _graph(case, target, draft, bushy)
    caches = [n for n in gm.meta["output_names"] if n[:2] in ("k_", "v_")]
    ref = call(gm, clone(x))  # the unrewritten graph returns the new caches

    gm = apply(gm, return_cache_rows)

    writes = gm.meta["cache_writes"]
    assert sorted({c for c, _, _ in writes}) == sorted(caches) and gm.meta["mutated_inputs"] == caches
    assert gm.meta["pass_counts"]["return_cache_rows"] == len(writes)
    kept = [k for k in ref if k not in caches]
    assert gm.meta["output_names"] == kept + [n for w in writes for n in w[1:]]
    args = clone(x)
    out = call(gm, args)
    for k in x:  # the graph itself writes nothing
        assert torch.equal(args[k], x[k]), f"{k} must not be mutated"
    for k in kept:
        exact(out[k], ref[k], k)
    for cache, rows, slots in writes:
        B, H, _, Dh = args[cache].shape
        assert out[rows].shape[:2] == (B, H) and out[rows].shape[3] == Dh
        assert out[slots].shape == (B, out[rows].shape[2]) and out[slots].dtype == torch.int64
        write_rows(args[cache], out[rows], out[slots])
    for k in caches:  # only the written rows: the caches the functional graph returned
        exact(args[k], ref[k], k)

