"""FX passes that turn the exported model graphs into speculative step graphs.

`default_passes(graph, cfg)` is the one ordered list per engine graph; the manifest records it
with each pass's rewrite count. Order is data: fusion first (on clean graphs), then the
attention rewrite, the structural passes (unroll, accept), and static_kv_cache last because it
is the only pass that introduces mutation.
"""

from __future__ import annotations

from functools import partial

from spec_compiler.trees import TreeSpec, chain

from .accept_epilogue import accept_epilogue
from .cleanup import cleanup
from .fuse_projections import fuse_projections
from .infra import Pass, run_passes
from .return_cache_rows import return_cache_rows
from .static_kv_cache import static_kv_cache
from .tensor_parallel import tensor_parallel
from .tree_attention import tree_attention
from .unroll_draft import unroll_draft

# Passes that must rewrite something on every graph they run on (the manifest test checks it).
REQUIRED = ("tree_attention", "unroll_draft", "accept_epilogue", "static_kv_cache")


def default_passes(graph: str, tree: TreeSpec, prefill_chunk: int, width: int | None = None,
                   project=None, shard: Pass | None = None, in_place: bool = True) -> list[Pass]:
    """graph: prefill | draft_prefill (block of prompt tokens), verify | verify_sampled (the tree),
    draft (step). `width`: the step state's accepted-pairs width (default the tree's depth + 1;
    engine_format: the deepest bucket's). `project`: an EAGLE-3 draft's fc, which unroll_draft
    applies to the target's fused features in the catch-up (its one-level graph reads the
    draft's own features). `shard`: a target graph's tensor_parallel pass (a TP engine), right
    after fusion (it splits the fused weights), before the attention rewrite. `in_place=False`
    (the ONNX backend: no in-place writes) returns each cache write's rows and slots instead of
    writing the caches (return_cache_rows)."""
    head = [cleanup, fuse_projections] + ([shard] if shard is not None else [])
    if graph in ("prefill", "draft_prefill"):
        middle = [partial(tree_attention, tree=chain(prefill_chunk - 1))]
    elif graph in ("verify", "verify_sampled"):
        middle = [partial(tree_attention, tree=tree),
                  partial(accept_epilogue, tree=tree, sampling=graph == "verify_sampled", width=width)]
    elif graph == "draft":
        middle = [partial(tree_attention, tree=None),
                  partial(unroll_draft, tree=tree, width=width, project=project)]
    else:
        raise ValueError(f"unknown graph {graph!r}")
    return head + middle + [static_kv_cache if in_place else return_cache_rows, cleanup]


__all__ = ["default_passes", "run_passes", "REQUIRED", "accept_epilogue", "cleanup",
           "fuse_projections", "return_cache_rows", "static_kv_cache", "tensor_parallel", "tree_attention",
           "unroll_draft"]
