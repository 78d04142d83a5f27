"""fuse_projections: q/k/v -> one linear, gate/up -> one linear; the model's outputs unchanged."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch.testing import FileCheck

from pass_utils import close, exact, apply, cache_names, call, config, eager, random_inputs, traced
from spec_compiler.passes import cleanup, fuse_projections
from spec_compiler.passes.infra import aten, count_ops
from spec_compiler.models.llama import Llama
from spec_compiler.trace import trace
from spec_compiler.trees import chain

LINEAR, SPLIT = aten.linear.default, aten.split_with_sizes.default


def _check_against_eager(gm, module, cfg, graph, T=None, seed=0):
    x = random_inputs(cfg, graph, seed, T=T)
    out = call(gm, x)
    logits, hidden, kv = eager(module, x["tokens"], x["input_pos"], x["cache_len"],
                               [x[k] for k in cache_names(gm)], x.get("features"))
    close(out["logits"], logits)
    close(out["hidden"], hidden)
    for k, ref in zip(cache_names(gm), kv, strict=True):
        close(out[k], ref, k)


@pytest.mark.parametrize("graph", ["prefill", "draft"])
def test_fuse_projections_rewrites_and_matches_eager(target, draft, graph):
    module = draft if graph == "draft" else target
    n_layers = len(module.layers)
    cfg = config(target, draft, chain(4))
    gm = apply(traced(cfg, graph, module), cleanup)
    n_lin, n_nodes = count_ops(gm, LINEAR), len(gm.graph.nodes)

    gm = apply(gm, fuse_projections)

    # per layer: q/k/v -> 1 (2 fewer) and gate/up -> 1 (1 fewer); o, down, lm_head (and fc) stay
    assert count_ops(gm, LINEAR) == n_lin - 3 * n_layers
    assert count_ops(gm, SPLIT) == 2 * n_layers
    assert gm.meta["pass_counts"]["fuse_projections"] == 2 * n_layers
    # group of n: +get_attr +linear +split +n getitem, -n linear -n weights (qkv 0, gate/up +1)
    assert len(gm.graph.nodes) == n_nodes + n_layers
    text = str(gm.graph)
    for i in range(n_layers):
        qkv = "__".join(f"layers_{i}_self_attn_{p}_proj_weight" for p in "qkv")
        gate_up = "__".join(f"layers_{i}_mlp_{p}_proj_weight" for p in ("gate", "up"))
        FileCheck().check(f"fused__{qkv}").check("aten.linear").check("split_with_sizes") \
            .check(f"fused__{gate_up}").check("aten.linear").check("split_with_sizes").run(text)
        attn = module.layers[i].self_attn
        exact(getattr(gm, f"fused__{qkv}"),
              torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv)
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    parts = r"layers\.\d+\.(self_attn\.[qkv]|mlp\.(gate|up))_proj\.weight"
    assert not [a for a in attrs if re.fullmatch(parts, a)]  # the unfused weights are unused
    assert sum(a.startswith("fused__") for a in attrs) == 2 * n_layers

    for seed, T in ((0, None), (1, 3), (2, 5)) if graph == "draft" else ((0, None), (1, None)):
        _check_against_eager(gm, module, cfg, graph, T=T, seed=seed)


def test_fuse_projections_with_biases(target, draft):
    torch.manual_seed(0)
    module = Llama(dataclasses.replace(target.cfg, attention_bias=True, mlp_bias=True)).eval()
    cfg = dataclasses.replace(config(target, draft, chain(4)), model=module.cfg)
    gm = traced(cfg, "prefill", module)
    n_lin = count_ops(gm, LINEAR)
    gm = apply(gm, fuse_projections)
    assert count_ops(gm, LINEAR) == n_lin - 3 * module.cfg.n_layers
    attn = module.layers[0].self_attn
    fused_bias = getattr(gm, "fused__" + "__".join(
        f"layers_0_self_attn_{p}_proj_weight" for p in "qkv") + "__bias")
    exact(fused_bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), "bias")
    _check_against_eager(gm, module, cfg, "prefill", seed=3)


def test_fuse_projections_noop_and_idempotent(target, draft):
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    gm = trace(mlp, (torch.randn(2, 8),), ["x"], ["y"])  # no input read by two linears
    n = len(gm.graph.nodes)
    assert fuse_projections(gm) is gm and len(gm.graph.nodes) == n
    assert gm.meta["pass_counts"]["fuse_projections"] == 0

    cfg = config(target, draft, chain(4))
    gm = apply(traced(cfg, "prefill", target), cleanup, fuse_projections)
    code, n = gm.code, len(gm.graph.nodes)
    assert fuse_projections(gm) is gm
    assert len(gm.graph.nodes) == n and gm.code == code  # a second run changes nothing
    assert gm.meta["pass_counts"]["fuse_projections"] == 2 * target.cfg.n_layers
