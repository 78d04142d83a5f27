"""The pass list on the real graphs: `pipeline.build_graph` for every engine graph.

Every required pass that ran rewrote something, passes ran in the documented order (fusion,
attention rewrite, structural pass, static_kv_cache last among the rewrites, cleanup around),
and each graph ends with the inputs/outputs the pipeline docstring lists.
"""

from __future__ import annotations

import pytest

from pass_utils import cache_names, config
from spec_compiler.passes import REQUIRED, default_passes
from spec_compiler.passes.infra import pass_name
from spec_compiler.pipeline import build_graph
from spec_compiler.trees import chain, resolve_tree

ORDER = {  # documented order (passes/__init__.py, pipeline.py)
    "prefill": ["cleanup", "fuse_projections", "tree_attention", "static_kv_cache", "cleanup"],
    "draft_prefill": ["cleanup", "fuse_projections", "tree_attention", "static_kv_cache",
                      "cleanup"],
    "verify": ["cleanup", "fuse_projections", "tree_attention", "accept_epilogue",
               "static_kv_cache", "cleanup"],
    "verify_sampled": ["cleanup", "fuse_projections", "tree_attention", "accept_epilogue",
                       "static_kv_cache", "cleanup"],
    "draft": ["cleanup", "fuse_projections", "tree_attention", "unroll_draft", "static_kv_cache",
              "cleanup"],
}
IO = {  # (inputs before the caches, inputs after them, outputs)
    "prefill": (["tokens", "cache_len"], [], ["logits", "hidden"]),
    "draft_prefill": (["tokens", "features", "cache_len"], [], ["hidden"]),
    "verify": (["tokens", "cache_len"], [], ["acc_tokens", "acc_feats", "n_acc", "cache_len"]),
    "verify_sampled": (["tokens", "cache_len"], ["temperature", "top_p", "top_k", "seed"],
                       ["acc_tokens", "acc_feats", "n_acc", "cache_len"]),
    "draft": (["acc_tokens", "acc_feats", "n_acc", "cache_len"], [], ["tree_tokens"]),
}


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain-4"])
def test_pipeline_graphs_run_required_passes_in_order(target, draft, tree):
    cfg = config(target, draft, resolve_tree(tree) if tree != "chain-4" else chain(4))
    for graph in ORDER:
        module = draft if graph.startswith("draft") else target
        gm = build_graph(cfg, graph, module, debug_dir=None)
        ran = gm.meta["passes"]
        assert ran == ORDER[graph], graph
        assert ran == [pass_name(p) for p in default_passes(graph, cfg.tree, cfg.prefill_chunk)]
        counts = gm.meta["pass_counts"]
        for name in REQUIRED:
            if name in ran:
                assert counts.get(name, 0) > 0, f"{graph}: required pass {name} rewrote nothing"
        assert {"tree_attention", "static_kv_cache"} <= set(ran) & set(REQUIRED)
        assert counts["fuse_projections"] == 2 * len(module.layers)  # q/k/v and gate/up per layer
        ins, after, outs = IO[graph]
        caches = cache_names(gm)
        assert len(caches) == 2 * len(module.layers)
        assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ins + caches + after, graph
        assert gm.meta["output_names"] == outs, graph
        assert gm.meta["mutated_inputs"] == caches, graph
