"""tree_attention: causal SDPA over [cache | block] -> spec::tree_attention with a static tree mask.

Chain tree: the same function as the unrewritten (causal) graph. Bushy tree: node n sees exactly
its ancestors, at rotary position cache_len + depth(n). No tree: causal over a block whose length
is only known at run time.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

from pass_utils import C, apply, cache_names, call, close, config, eager, random_inputs, traced
from spec_compiler.passes import cleanup, fuse_projections, tree_attention
from spec_compiler.passes.infra import aten, count_ops, placeholders
from spec_compiler.errors import SpecCompileError
from spec_compiler.trees import chain

SDPA, TREE_ATTN = aten.scaled_dot_product_attention.default, torch.ops.spec.tree_attention.default


def _rewrite(gm, tree):
    return apply(gm, cleanup, fuse_projections, lambda g: tree_attention(g, tree=tree))


def _check_shape(gm, n_layers: int, has_input_pos: bool):
    assert count_ops(gm, SDPA) == 0
    assert count_ops(gm, TREE_ATTN) == n_layers == gm.meta["pass_counts"]["tree_attention"]
    assert ("input_pos" in placeholders(gm)) == has_input_pos
    FileCheck().check_not("scaled_dot_product_attention").check_count(
        "spec.tree_attention", n_layers, exactly=True).run(str(gm.graph))


def test_chain_tree_equals_unrewritten_graph(target, draft):
    cfg = config(target, draft, chain(4))
    ref_gm = traced(cfg, "prefill", target)
    gm = _rewrite(traced(cfg, "prefill", target), chain(C - 1))
    _check_shape(gm, target.cfg.n_layers, has_input_pos=False)
    assert torch.equal(getattr(gm, f"tree_mask_{C}"), torch.ones(C, C, dtype=torch.bool).tril())
    for seed in (0, 1):
        x = random_inputs(cfg, "prefill", seed)  # input_pos = cache_len + [0, C): chain depths
        out, ref = call(gm, x), call(ref_gm, x)
        assert list(out) == list(ref) == ["logits", "hidden", *cache_names(gm)]
        for k in ref:
            close(out[k], ref[k], k)


def test_bushy_tree_node_sees_exactly_its_ancestors(target, draft, bushy):
    """logits[n] == eager Llama run causally on the path root..n alone at cache_len + [0, depth]."""
    cfg = config(target, draft, bushy)
    gm = _rewrite(traced(cfg, "verify", target), bushy)
    _check_shape(gm, target.cfg.n_layers, has_input_pos=False)
    x = random_inputs(cfg, "verify", seed=2)
    out = call(gm, x)
    caches = [x[k] for k in cache_names(gm)]
    tokens, cache_len = x["tokens"], x["cache_len"]
    B = tokens.shape[0]
    for n in range(bushy.n_nodes):
        path = bushy.ancestors(n)  # root .. n
        pos = cache_len[:, None] + torch.arange(len(path))
        logits, hidden, kv = eager(target, tokens[:, path], pos, cache_len, caches)
        close(out["logits"][:, n], logits[:, -1], f"node {n}")
        close(out["hidden"][:, n], hidden[:, -1], f"node {n}")
        for name, ref in zip(cache_names(gm), kv):  # node n's K/V: tree slot n, path slot depth
            for b in range(B):
                c = int(cache_len[b])
                close(out[name][b, :, c + n], ref[b, :, c + len(path) - 1], f"{name} node {n}")
    for name in cache_names(gm):
        for b in range(B):
            c = int(cache_len[b])
            end = c + bushy.n_nodes
            assert torch.equal(out[name][b, :, :c], x[name][b, :, :c])  # the prefix is untouched
            assert torch.equal(out[name][b, :, end:], x[name][b, :, end:])


def test_no_tree_is_causal_at_any_block_length(target, draft, bushy):
    cfg = config(target, draft, bushy)
    ref_gm = traced(cfg, "draft", draft)  # dynamic T, as the pipeline traces 'draft'
    gm = _rewrite(traced(cfg, "draft", draft), None)
    _check_shape(gm, draft.cfg.n_layers, has_input_pos=True)
    FileCheck().check("sym_size").check("aten.ones").check("aten.tril").run(str(gm.graph))
    for seed, T in ((3, 3), (4, 6)):
        x = random_inputs(cfg, "draft", seed, T=T)
        out, ref = call(gm, x), call(ref_gm, x)
        assert out["logits"].shape[1] == T
        for k in ref:
            close(out[k], ref[k], f"{k} T={T}")


@pytest.mark.parametrize("tree", [None, chain(C - 1)], ids=["no_tree", "chain"])
def test_tree_attention_requires_a_match(target, draft, tree):
    graph = "draft_prefill" if tree is not None else "draft"
    gm = _rewrite(traced(config(target, draft, chain(4)), graph, draft), tree)
    n = len(gm.graph.nodes)
    with pytest.raises(SpecCompileError, match="tree_attention: 0 matches"):
        tree_attention(gm, tree=tree)  # a second run: no causal SDPA left to rewrite
    assert len(gm.graph.nodes) == n


# ---- only the causal [cache | block] pattern is rewritten ------------------------------------

class _TwoAttentions(torch.nn.Module):
    """Two attentions over their own caches with the same cache_len: the first exactly as the
    model writes it (models.llama.cache_attention), the second with `variant`'s mask or scale."""

    def __init__(self, variant: str, T: int, S: int):
        super().__init__()
        self.variant = variant
        self.register_buffer("bias", torch.randn(1, 1, T, S, generator=torch.Generator().manual_seed(7)))

    def forward(self, q, k, v, cache_len, k_0, v_0, k_1, v_1):
        from spec_compiler.models.llama import cache_attention, causal_slot_mask, write_cache

        o1, k0, v0 = cache_attention(q, k, v, k_0, v_0, cache_len)
        k1, v1 = write_cache(k_1, k, cache_len), write_cache(v_1, v, cache_len)
        T, S = k.shape[2], k_1.shape[2]
        causal = causal_slot_mask(cache_len, T, S)
        scale = None
        if self.variant == "sliding_window":  # window 2: a query sees its slot and the one before
            mask = causal & ~causal_slot_mask(cache_len - 2, T, S)
        elif self.variant == "non_causal":  # the whole block sees the whole block
            mask = (torch.arange(S) < (cache_len + T)[:, None])[:, None, None, :].expand(-1, 1, T, -1)
        elif self.variant == "additive":  # an extra additive term on top of the causal mask
            mask = torch.zeros(causal.shape).masked_fill(~causal, float("-inf")) + self.bias
        elif self.variant == "other_cache_len":  # causal over a cache one slot longer
            mask = causal_slot_mask(cache_len + 1, T, S)
        elif self.variant == "scale":
            mask, scale = causal, 0.3
        else:
            mask = causal
        o2 = torch.nn.functional.scaled_dot_product_attention(q, k1, v1, attn_mask=mask, scale=scale,
                                                              enable_gqa=True)
        return o1 + o2, k0, v0, k1, v1


VARIANTS = ["sliding_window", "non_causal", "additive", "other_cache_len", "scale"]


def _two_attention_graph(variant: str):
    from spec_compiler.trace import trace

    B, Hq, Hkv, T, S, Dh = 2, 4, 2, 5, 24, 8
    g = torch.Generator().manual_seed(1)
    x = {"q": torch.randn(B, Hq, T, Dh, generator=g), "k": torch.randn(B, Hkv, T, Dh, generator=g),
         "v": torch.randn(B, Hkv, T, Dh, generator=g), "cache_len": torch.tensor([3, 11])}
    x.update({f"{kv}_{i}": torch.randn(B, Hkv, S, Dh, generator=g) for i in range(2) for kv in "kv"})
    gm = trace(_TwoAttentions(variant, T, S), list(x.values()), list(x), ["o", "k_0", "v_0", "k_1", "v_1"])
    return apply(gm, cleanup), x, T


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_causal_attention_is_rewritten(variant):
    """The probe that found the bug: a sliding-window SDPA over a scatter-written cache was
    rewritten and its output changed by up to 1.87. Now each variant is left alone (one rewrite,
    the causal layer's) and the graph computes what it did."""
    gm, x, T = _two_attention_graph(variant)
    ref = call(gm, x)
    n_sdpa = count_ops(gm, SDPA)
    assert n_sdpa == 2
    gm = apply(gm, lambda g: tree_attention(g, tree=chain(T - 1)))
    assert gm.meta["pass_counts"]["tree_attention"] == 1
    assert count_ops(gm, SDPA) == 1 and count_ops(gm, TREE_ATTN) == 1
    out = call(gm, x)
    for k in ref:
        close(out[k], ref[k], f"{variant}: {k}")
    # And the variant is really different from causal attention: were it rewritten, it would show.
    causal, _, _ = _two_attention_graph("causal")
    assert (call(causal, x)["o"] - ref["o"]).abs().max() > 1e-2, "the variant changes nothing"


@pytest.mark.parametrize("variant", ["causal", *VARIANTS])
def test_a_graph_without_the_pattern_raises_and_is_unchanged(variant):
    gm, x, T = _two_attention_graph(variant)
    gm = apply(gm, lambda g: tree_attention(g, tree=chain(T - 1)))  # rewrites the causal layer
    code, n = gm.code, len(gm.graph.nodes)
    with pytest.raises(SpecCompileError, match="tree_attention: 0 matches"):
        tree_attention(gm, tree=chain(T - 1))  # the variant layer never matches
    assert gm.code == code and len(gm.graph.nodes) == n
