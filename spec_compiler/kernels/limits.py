"""Sizes the tree-attention kernels support, readable without importing triton.

`spec_compiler.kernels.tree_attention` enforces them per call (a ValueError naming the limit);
`CompileConfig` and `spec-fit-tree` reject trees and prefill chunks past them up front, on every
device, so an engine never depends on where it was built and a fitted tree compiles anywhere.

Every `spec::tree_attention` call attends T query positions over Tk suffix keys (plus the cache):
  prefill, draft_prefill   T = Tk = --prefill-chunk (causal mask)
  verify                   T = Tk = tree nodes (with the root)
  draft catch-up           T = Tk = tree depth + 1 <= tree nodes
  draft level d            T = that level's forwarded nodes, Tk = every forwarded node so far
                           (nodes with children, root excluded: passes/unroll_draft.py
                           `_widen_suffix`), so Tk < tree nodes
so bounding the tree's node count and the prefill chunk by min(MAX_QUERIES, MAX_SUFFIX_KEYS)
bounds every call of every graph.

The kernels loop over query row blocks (grid) and suffix key tiles (a constexpr trip count), so
these are not hard structural limits: they are the largest sizes the kernel tests exercise
(tests/test_tree_attention_kernels.py runs both at the limit).
"""

MAX_QUERIES = 1024  # T: query positions (tree nodes, prefill tokens) per call
MAX_SUFFIX_KEYS = 1024  # Tk: keys in the masked suffix per call
MAX_TREE_NODES = min(MAX_QUERIES, MAX_SUFFIX_KEYS)  # with the root
MAX_PREFILL_CHUNK = min(MAX_QUERIES, MAX_SUFFIX_KEYS)
MAX_HEAD_DIM = 256
