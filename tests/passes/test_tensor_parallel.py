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
from spec_compiler.passes.tensor_parallel import ALL_REDUCE, check_tp, kv_heads, tensor_parallel
from spec_compiler.trace import input_names
from spec_compiler.trees import chain

WAIT = torch.ops._c10d_functional.wait_tensor.default


def tiny(n_heads: int, n_kv_heads: int, bias: bool = False, seed: int = 0) -> Llama:
    """A random 2-layer Llama with these head counts (head_dim 16, intermediate 96)."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=16, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    m = Llama(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def rank_graphs(cfg, graph, module, tp):
    """(unsharded graph, [rank graphs]), all through the graph's passes but static_kv_cache
    (the caches are compared as returned values)."""
    def build(shard):
        passes = default_passes(graph, cfg.tree, cfg.prefill_chunk, shard=shard)[:-2]
        return apply(traced(cfg, graph, module), *passes)
    return build(None), [build(partial(tensor_parallel, model=module.cfg, tp=tp, rank=r)) for r in range(tp)]


def lockstep(gms: list[fx.GraphModule], inputs: list[dict]) -> list[dict]:
    """Run the ranks' graphs node by node; an all-reduce is the sum over ranks."""
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


@pytest.mark.parametrize("heads,tp,graph,bias", [
    ((8, 4), 2, "verify", False),      # kv heads split 2 + 2
    ((8, 4), 4, "prefill", False),     # one kv head each
    ((4, 2), 4, "verify", True),       # 2 kv heads replicated on 2 ranks each; biases added once
    ((9, 3), 3, "verify", False),      # SmolLM2's heads: 9 q, 3 kv heads at TP=3
])
def test_ranks_sum_to_the_unsharded_graph(target, draft, heads, tp, graph, bias):
    module = tiny(*heads, bias=bias)
    cfg = dataclasses.replace(config(target, draft, chain(2)), model=module.cfg)
    full, ranks = rank_graphs(cfg, graph, module, tp)
    n_layers = module.cfg.n_layers
    for gm in ranks:  # graph shape: two all-reduces per layer, each waited on, in every rank graph
        assert count_ops(gm, ALL_REDUCE) == 2 * n_layers and count_ops(gm, WAIT) == 2 * n_layers
        assert input_names(gm) == input_names(ranks[0])
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


@pytest.mark.parametrize("heads,tp,what", [
    ((4, 2), 3, "must divide the model's 2 KV heads or be a multiple"),
    ((4, 2), 8, "must divide the model's 4 attention heads"),
    ((4, 2), 0, "must be at least 1"),
])
def test_bad_degree_is_one_clear_line(heads, tp, what):
    with pytest.raises(SpecCompileError, match=what) as e:
        check_tp(tiny(*heads).cfg, tp)
    assert "\n" not in str(e.value)
