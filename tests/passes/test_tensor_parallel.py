"""tensor_parallel: each rank's graph holds its heads and its MLP slice, with one all-reduce after
each row-parallel projection; the ranks' graphs run in lockstep in one process (each all-reduce
the sum of the ranks' inputs, no process group) give the unsharded graph's logits, hidden state
and caches (the ranks' caches concatenated by kv head)."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch import fx

from pass_utils import apply, call, close, config, random_inputs, traced
from spec_compiler.config import ModelConfig
from spec_compiler.errors import SpecCompileError
from spec_compiler.models.llama import Llama
from spec_compiler.passes import cleanup, default_passes, fuse_projections
from spec_compiler.passes.infra import count_ops
from spec_compiler.passes.tensor_parallel import ALL_GATHER, ALL_REDUCE, check_tp, kv_heads, tensor_parallel
from spec_compiler.trace import input_names
from spec_compiler.trees import chain

WAIT = torch.ops._c10d_functional.wait_tensor.default


def tiny(n_heads: int, n_kv_heads: int, bias: bool = False, seed: int = 0, tied: bool = False) -> Llama:
    """A random 2-layer Llama with these head counts (head_dim 16, intermediate 96)."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=16, attention_bias=bias, mlp_bias=bias,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    m = Llama(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def rank_graphs(cfg, graph, module, tp, lm_head="replicated"):
    """(unsharded graph, [rank graphs]), all through the graph's passes but static_kv_cache
    (the caches are compared as returned values)."""
    def build(shard):
        passes = default_passes(graph, cfg.tree, cfg.prefill_chunk, shard=shard)[:-2]
        return apply(traced(cfg, graph, module), *passes)
    return build(None), [build(partial(tensor_parallel, model=module.cfg, tp=tp, rank=r, lm_head=lm_head))
                         for r in range(tp)]


def lockstep(gms: list[fx.GraphModule], inputs: list[dict]) -> list[dict]:
    """Run the ranks' graphs node by node; an all-reduce is the sum over ranks, an all-gather
    the ranks' inputs concatenated along dim 0 in rank order."""
    runs = [fx.Interpreter(gm) for gm in gms]
    envs: list[dict] = [{} for _ in gms]
    node_lists = [list(gm.graph.nodes) for gm in gms]
    outs = [None] * len(gms)
    for nodes in zip(*node_lists, strict=True):
        if nodes[0].op == "call_function" and nodes[0].target == ALL_REDUCE:
            total = sum(env[n.args[0]] for env, n in zip(envs, nodes))
            for env, n in zip(envs, nodes):
                env[n] = total.clone()
            continue
        if nodes[0].op == "call_function" and nodes[0].target == ALL_GATHER:
            joined = torch.cat([env[n.args[0]] for env, n in zip(envs, nodes)], 0)
            for env, n in zip(envs, nodes):
                env[n] = joined.clone()
            continue
        for r, (run, env, n) in enumerate(zip(runs, envs, nodes)):
            if n.op == "placeholder":
                env[n] = inputs[r][n.target]
            elif n.op == "output":
                out = fx.map_arg(n.args[0], lambda a: env[a])
                outs[r] = dict(zip(gms[r].meta["output_names"], out, strict=True))
            else:
                run.env = env
                args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env[a])
                env[n] = getattr(run, n.op)(n.target, args, kwargs)
    return outs


def shard_inputs(x: dict, n_kv: int, tp: int) -> list[dict]:
    return [{k: v[:, kv_heads(n_kv, tp, r)].clone() if k[:2] in ("k_", "v_") else v.clone()
             for k, v in x.items()} for r in range(tp)]


@pytest.mark.parametrize("heads,tp,graph,bias,lm_head,tied", [
    ((8, 4), 2, "verify", False, "replicated", False),  # kv heads split 2 + 2
    ((8, 4), 4, "prefill", False, "replicated", False),  # one kv head each
    ((4, 2), 4, "verify", True, "replicated", False),    # 2 kv heads replicated on 2 ranks each; biases added once
    ((9, 3), 3, "verify", False, "replicated", False),   # SmolLM2's heads: 9 q, 3 kv heads at TP=3
    ((8, 4), 2, "verify", False, "vocab", False),        # each rank's half of the logits, all-gathered
    ((8, 4), 4, "prefill", False, "vocab", True),        # tied: the embedding keeps the whole matrix
])
def test_ranks_sum_to_the_unsharded_graph(target, draft, heads, tp, graph, bias, lm_head, tied):
    module = tiny(*heads, bias=bias, tied=tied)
    cfg = dataclasses.replace(config(target, draft, chain(2)), model=module.cfg)
    full, ranks = rank_graphs(cfg, graph, module, tp, lm_head)
    n_layers, gathers = module.cfg.n_layers, int(lm_head == "vocab")
    for gm in ranks:  # graph shape: two all-reduces per layer (+ the logits' all-gather), each waited on
        assert count_ops(gm, ALL_REDUCE) == 2 * n_layers and count_ops(gm, ALL_GATHER) == gathers
        assert count_ops(gm, WAIT) == 2 * n_layers + gathers
        assert input_names(gm) == input_names(ranks[0])
        if lm_head == "vocab":  # the projection reads this rank's 1/tp of the rows
            V, H = module.cfg.vocab_size, module.cfg.hidden_size
            params = dict(gm.named_parameters())
            shard = [n for n in ("tp__lm_head_weight", "tp__embed_tokens_weight") if n in params]
            assert len(shard) == 1 and params[shard[0]].shape == (V // tp, H)
            last = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default][-1]  # the logits'
            assert last.args[1].target == shard[0]  # (a tied embedding still reads every row)
    assert count_ops(full, ALL_REDUCE) == 0
    x = random_inputs(cfg, graph, seed=3)
    ref = call(full, {k: v.clone() for k, v in x.items()})
    outs = lockstep(ranks, shard_inputs(x, heads[1], tp))
    for r, out in enumerate(outs):
        assert out.keys() == ref.keys()
        for k, v in out.items():
            want = ref[k][:, kv_heads(heads[1], tp, r)] if k[:2] in ("k_", "v_") else ref[k]
            if v.is_floating_point():
                close(v, want, f"rank {r} {k}")
            else:  # accepted tokens and counts: exact
                assert torch.equal(v, want), f"rank {r} {k}"


def test_rank_shards_are_consistent(target, draft):
    """Every rank graph holds its own slice of each sharded weight; the shards cover the weight."""
    module = tiny(8, 4)
    cfg = dataclasses.replace(config(target, draft, chain(2)), model=module.cfg)
    gm = apply(traced(cfg, "prefill", module), cleanup, fuse_projections,
               partial(tensor_parallel, model=module.cfg, tp=2, rank=1))
    shards = gm.meta["tp_shards"]
    assert len(shards) == 4 * module.cfg.n_layers  # qkv, o, gate/up, down per layer
    down = shards["tp__layers_0_mlp_down_proj_weight"]
    assert torch.equal(torch.cat(down, 1), module.layers[0].mlp.down_proj.weight)
    assert torch.equal(gm.tp__layers_0_mlp_down_proj_weight, down[1])
    assert gm.meta["pass_counts"]["tensor_parallel"] == 2 * module.cfg.n_layers


@pytest.mark.parametrize("heads,tp,what,lm_head", [
    ((4, 2), 3, "must divide the model's 2 KV heads or be a multiple", "replicated"),
    ((4, 2), 8, "must divide the model's 4 attention heads", "replicated"),
    ((4, 2), 0, "must be at least 1", "replicated"),
    ((4, 2), 2, "--tp-lm-head 'rows': expected one of replicated, vocab", "rows"),
])
def test_bad_degree_is_one_clear_line(heads, tp, what, lm_head):
    with pytest.raises(SpecCompileError, match=what) as e:
        check_tp(tiny(*heads).cfg, tp, lm_head)
    assert "\n" not in str(e.value)


def test_vocab_shards_need_a_degree_that_divides_the_vocabulary():
    cfg = dataclasses.replace(tiny(4, 2).cfg, vocab_size=130)
    check_tp(cfg, 2, "vocab")
    with pytest.raises(SpecCompileError, match=r"--tp-lm-head vocab: --tp 4 must divide the vocabulary "
                       r"\(130 tokens\); use --tp-lm-head replicated"):
        check_tp(cfg, 4, "vocab")
