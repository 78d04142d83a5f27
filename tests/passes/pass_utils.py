"""Helpers shared by the pass tests: trace an engine graph the way `pipeline.build_graph` does
(but run no passes), make random inputs for it, and call graphs and eager modules by input name."""

from __future__ import annotations

import copy

import torch
from torch import fx

from spec_compiler.config import CompileConfig
from spec_compiler import engine_format as fmt
from spec_compiler.pipeline import trace_graph
from spec_compiler.trace import input_names
from spec_compiler.trees import TreeSpec

S, C = 64, 8  # cache capacity, prefill chunk: small, so the tests stay sub-second


def config(target, draft, tree: TreeSpec, batch_size: int = 2) -> CompileConfig:
    return CompileConfig(model=target.cfg, draft=draft.cfg, tree=tree, max_seq_len=S,
                         prefill_chunk=C, batch_size=batch_size)


def graph_inputs(cfg: CompileConfig, graph: str) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of the graph's inputs as exported (the engine contract's)."""
    return [(t.name, t.shape, fmt.DTYPES[t.dtype])
            for t in fmt.traced_inputs(fmt.Dims.from_config(cfg), graph)]


def traced(cfg: CompileConfig, graph: str, module: torch.nn.Module) -> fx.GraphModule:
    """The exported graph `build_graph` hands to its passes (same inputs, outputs, dynamic dims).
    Each call returns a fresh copy (passes mutate in place); the export itself is cached, since
    it is the slow part (seconds on a loaded 2-core box)."""
    specs = graph_inputs(cfg, graph)
    key = (id(module), graph, tuple((n, s) for n, s, _ in specs))
    if key not in _TRACES:
        _TRACES[key] = (module, trace_graph(cfg, graph, module))  # holding the module keeps id unique
    return copy_graph(_TRACES[key][1])


_TRACES: dict[tuple, tuple[torch.nn.Module, fx.GraphModule]] = {}


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of gm's graph (nodes, meta) sharing gm's parameters."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, g)
    new.meta = {k: copy.copy(v) for k, v in gm.meta.items()}
    return new


def apply(gm: fx.GraphModule, *passes) -> fx.GraphModule:
    """Run passes in order. Each returns the module it rewrote: the same one, mutated in place,
    except unroll_draft, which retraces the step into a new module sharing the parameters."""
    for p in passes:
        out = p(gm)
        assert out is gm or getattr(p, "func", p).__name__ == "unroll_draft", \
            "passes mutate in place and return the same module"
        gm = out
        gm.graph.lint()
    return gm


def cache_names(gm_or_names) -> list[str]:
    names = gm_or_names if isinstance(gm_or_names, list) else input_names(gm_or_names)
    return [n for n in names if n[:2] in ("k_", "v_")]


def random_inputs(cfg: CompileConfig, graph: str, seed: int, T: int | None = None,
                  min_len: int = 1) -> dict[str, torch.Tensor]:
    """Random tokens/features, random caches (every slot, so stale slots must be ignored),
    distinct random cache_len per row, input_pos = cache_len + [0, T)."""
    g = torch.Generator().manual_seed(seed)
    B = cfg.batch_size
    # Leave room for the writes of an unrewritten block: the prefill chunk, every tree node (before
    # accept_epilogue compacts them) or the catch-up pairs.
    hi = S - max(cfg.prefill_chunk, cfg.tree.n_nodes, cfg.tree.max_depth + 1)
    cache_len = torch.randperm(hi - min_len + 1, generator=g)[:B] + min_len  # (B,), distinct
    out = {}
    for name, shape, dtype in graph_inputs(cfg, graph):
        if T is not None and name in ("tokens", "features", "input_pos"):
            shape = (shape[0], T, *shape[2:])
        if name == "tokens":
            out[name] = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
        elif name == "input_pos":
            out[name] = cache_len[:, None] + torch.arange(shape[1])
        elif name == "cache_len":
            out[name] = cache_len.clone()
        else:
            out[name] = torch.randn(shape, generator=g, dtype=dtype)
    if graph == "verify":  # the sampling inputs accept_epilogue adds: greedy rows
        out.update(greedy_knobs(B))
    return out


def greedy_knobs(B: int) -> dict[str, torch.Tensor]:
    return {"temperature": torch.zeros(B), "top_p": torch.ones(B), "top_k": torch.zeros(B, dtype=torch.long),
            "seed": torch.zeros(B, dtype=torch.long)}


def call(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a graph with inputs bound by placeholder name; outputs by name."""
    outs = gm(*[inputs[n] for n in input_names(gm)])
    return dict(zip(gm.meta["output_names"], outs, strict=True))


def eager(module: torch.nn.Module, tokens, input_pos, cache_len, caches: list, features=None):
    """Llama / EagleDraft forward -> (logits, hidden, [new caches])."""
    lead = (tokens,) if features is None else (tokens, features)
    logits, hidden, *kv = module(*lead, input_pos, cache_len, *caches)
    return logits, hidden, kv


def clone(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in inputs.items()}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", rel: float = 1e-5):
    """fp32, two implementations of the same math (e.g. SDPA vs two-pass tree attention): every
    element within `rel` of the tensor's scale (the tiny models' logits reach ~100, and fp32
    round-off in a sum is relative to its terms, not to a small result)."""
    atol = rel * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def exact(actual: torch.Tensor, expected: torch.Tensor, what: str = ""):
    """The same ops on the same inputs: bit-for-bit."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def draft_step_inputs(cfg: CompileConfig, seed: int, n_acc: list[int]) -> dict[str, torch.Tensor]:
    """Inputs of the unrolled draft step: D+1 accepted (token, feature) pairs of which the first
    n_acc[b] are real (the rest is padding), and cache_len >= n_acc (the pairs' slots end there)."""
    g = torch.Generator().manual_seed(seed)
    B, D1, H = cfg.batch_size, cfg.tree.max_depth + 1, fmt.Dims.from_config(cfg).feature_dim
    assert len(n_acc) == B
    x = random_inputs(cfg, "draft", seed, min_len=max(n_acc))
    return {"acc_tokens": torch.randint(0, cfg.model.vocab_size, (B, D1), generator=g),
            "acc_feats": torch.randn(B, D1, H, generator=g),
            "n_acc": torch.tensor(n_acc), "cache_len": x["cache_len"],
            **{k: v for k, v in x.items() if k[:2] in ("k_", "v_")}}
