"""Tensor parallelism (Megatron layout): one rank's share of a target graph, with an all-reduce
after each row-parallel projection.

Before:  qkv = linear(x, Wqkv).split([Hq*Dh, Hkv*Dh, Hkv*Dh]);  ...;  o = linear(a, Wo)
         gu = linear(x, Wgu).split([I, I]);  d = linear(silu(g) * u, Wdown)
After:   the same, with this rank's rows of Wqkv (its q heads and their kv heads) and of Wgu (its
         I/N slice of gate and of up), its columns of Wo and Wdown, and
         o = wait(all_reduce(linear(a, Wo_r), "sum")) (+ bias), the same for d; the caches hold
         its kv heads only.
KV heads: N divides Hkv (rank r holds Hkv/N of them), or N is a multiple of Hkv and each kv head
is replicated on N/Hkv ranks (rank r holds head r // (N/Hkv)), as vLLM does: a rank's q heads
always fall in its kv heads' GQA groups. The embedding and norms stay replicated. The lm_head
(`lm_head`, --tp-lm-head): "replicated" (default: every rank computes the whole logits; the cost
is each rank reading the whole lm_head, README: Tensor parallelism) or "vocab" (each rank
computes its 1/N of the vocabulary and an all-gather gives every rank the whole logits). Either
way acceptance and sampling run unchanged and identically on every rank.
Collectives are the functional ones (`_c10d_functional`), so the graph stays traceable and
AOTInductor compiles them; they name the default process group, "0", the first one a process
creates. The graph is built for `rank`; `gm.meta["tp_shards"]` has every rank's tensor of each
sharded weight (their names are new: graphs that share a weight share its shards), so the
artifacts are compiled once and only the weights differ per rank.
Runs after fuse_projections (it splits the fused weights) and before tree_attention (which
traces its pattern at the graph's new head counts) and static_kv_cache (mutation stays last).
The literal head sizes the exported model has (the q/k/v views, the cache writes' index expand,
the attention output's reshape, SDPA's enable_gqa) are rewritten; every node's meta["val"] is then
recomputed, so a size this pass does not know fails here, not at run time.
Requires: fused q/k/v and gate/up projections (fuse_projections). Required: raises if none match.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import fx

from spec_compiler import engine_format as fmt
from spec_compiler.config import ModelConfig
from spec_compiler.errors import SpecCompileError

from .infra import (attr_node, aten, call_traced, fake_mode, finish, get_attr_path, placeholders, record,
                    require, set_attr_path)

GROUP = "0"  # the default process group's name: the first group a process creates
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default
LOGITS_WEIGHTS = ("lm_head.weight", "embed_tokens.weight")  # the exported target's names (tied: the second)
LM_HEAD = ("replicated", "vocab")  # --tp-lm-head: every rank reads all of it, or its 1/N of the rows
_SHAPED = (aten.view.default, aten.reshape.default)


def check_tp(model: ModelConfig, tp: int, lm_head: str = "replicated") -> None:
    """--tp N (and --tp-lm-head) fits the model: one line naming the sizes otherwise."""
    hq, hkv, inter = model.n_heads, model.n_kv_heads, model.intermediate_size
    if tp < 1:
        raise SpecCompileError(f"--tp {tp}: must be at least 1")
    if hkv % tp and tp % hkv:
        raise SpecCompileError(f"--tp {tp}: must divide the model's {hkv} KV heads or be a multiple of "
                               f"them (KV heads are then replicated); try --tp {_fits(model)}")
    if hq % tp or inter % tp:
        raise SpecCompileError(f"--tp {tp}: must divide the model's {hq} attention heads and its "
                               f"intermediate size {inter}; try --tp {_fits(model)}")
    if lm_head not in LM_HEAD:
        raise SpecCompileError(f"--tp-lm-head {lm_head!r}: expected one of {', '.join(LM_HEAD)}")
    if lm_head == "vocab" and model.vocab_size % tp:
        raise SpecCompileError(f"--tp-lm-head vocab: --tp {tp} must divide the vocabulary "
                               f"({model.vocab_size} tokens); use --tp-lm-head replicated")


def _fits(model: ModelConfig) -> str:
    ok = [n for n in range(1, model.n_heads + 1) if not (model.n_kv_heads % n and n % model.n_kv_heads)
          and not model.n_heads % n and not model.intermediate_size % n]
    return " or ".join(map(str, ok))


def kv_heads(n_kv: int, tp: int, rank: int) -> list[int]:
    """The kv heads rank `rank` of `tp` holds."""
    if n_kv % tp == 0:
        per = n_kv // tp
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (tp // n_kv)]


def local_kv_heads(n_kv: int, tp: int) -> int:
    return len(kv_heads(n_kv, tp, 0))


def rank_dims(dims: fmt.Dims, tp: int) -> fmt.Dims:
    """An engine's dims as each rank's graphs and state see them: its kv heads."""
    return dataclasses.replace(dims, n_kv_heads=local_kv_heads(dims.n_kv_heads, tp))


def shard_pass(cfg, graph: str):
    """The tensor_parallel pass of `graph` in a compile of `cfg` (a CompileConfig), or None: at
    TP 1, and for the draft's graphs (the draft is replicated: no collectives in its loop)."""
    if cfg.tp == 1 or fmt.owner(graph) != "target":
        return None
    return partial(tensor_parallel, model=cfg.model, tp=cfg.tp, lm_head=cfg.tp_lm_head)


class RankWeights:
    """Every rank's weights: the engine's (lifted) weights with, for each weight a graph sharded,
    that rank's shard (`gm.meta["tp_shards"]`, named as the graph's parameter)."""

    def __init__(self):
        self.shards: dict[str, list[torch.Tensor]] = {}

    def add(self, gm: fx.GraphModule) -> None:
        self.shards.update(gm.meta.pop("tp_shards", {}))

    def of(self, registry, rank: int) -> dict[str, torch.Tensor]:
        missing = set(self.shards) - set(registry.tensors)
        assert not missing, f"sharded weights {sorted(missing)[:3]} were not lifted under their names"
        return {k: self.shards[k][rank] if k in self.shards else v for k, v in registry.tensors.items()}


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(ALL_REDUCE(x, "sum", GROUP))


def gather_last(x: torch.Tensor, tp: int) -> torch.Tensor:
    """(..., V/tp) on each rank -> (..., V), the ranks' parts in rank order (the functional
    all-gather concatenates along dim 0, so the last dim is moved there and back)."""
    parts = torch.ops._c10d_functional.wait_tensor(ALL_GATHER(x.movedim(-1, 0).contiguous(), tp, GROUP))
    return parts.movedim(0, -1)


def tensor_parallel(gm: fx.GraphModule, *, model: ModelConfig, tp: int, rank: int = 0,
                    lm_head: str = "replicated") -> fx.GraphModule:
    check_tp(model, tp, lm_head)
    hq, hkv, dh, inter = model.n_heads, model.n_kv_heads, model.head_dim, model.intermediate_size
    shards = gm.meta.setdefault("tp_shards", {})

    def rows(heads, offset):  # the weight rows of `heads`, heads of dh rows from `offset`
        return [offset + h * dh + i for h in heads for i in range(dh)]

    def q_of(r):  # rank r's q heads
        return range(r * hq // tp, (r + 1) * hq // tp)

    def mlp_of(r):  # rank r's slice of the intermediate size
        return list(range(r * inter // tp, (r + 1) * inter // tp))

    def qkv_of(r):  # rank r's rows of the fused q/k/v weight
        kv = kv_heads(hkv, tp, r)
        return rows(q_of(r), 0) + rows(kv, hq * dh) + rows(kv, (hq + hkv) * dh)

    lq, lkv = len(q_of(rank)), len(kv_heads(hkv, tp, rank))  # this rank's q and kv heads

    def share(node: fx.Node, dim: int, pick) -> None:
        """Point get_attr `node` (every use of it) at its shard along `dim`: `pick(r)` the
        indices rank r keeps."""
        name = _shard(gm, shards, node.target, dim, pick, tp, rank)
        with gm.graph.inserting_before(node):
            new = attr_node(gm, name)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    qkv_sizes = [hq * dh, hkv * dh, hkv * dh]
    count = 0
    for lin in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]:
        split = next(iter(lin.users)) if len(lin.users) == 1 else None
        if split is None or split.target != aten.split_with_sizes.default or not isinstance(lin.args[1], fx.Node):
            continue
        attention = list(split.args[1]) == qkv_sizes
        if not attention and list(split.args[1]) != [inter, inter]:
            continue
        for w in lin.args[1:3]:  # the column-parallel weight (and bias): rows
            if isinstance(w, fx.Node):
                share(w, 0, qkv_of if attention else lambda r: mlp_of(r) + [inter + i for i in mlp_of(r)])
        row = _next_linear(split)  # o_proj or down_proj: columns
        share(row.args[1], 1, (lambda r: rows(q_of(r), 0)) if attention else mlp_of)
        if attention:
            heads, mine = [hq, hkv, hkv], [lq, lkv, lkv]
            split.args = (split.args[0], [n * dh for n in mine], *split.args[2:])
            for part in list(split.users):  # getitem -> view (B, T, H, Dh): this rank's head count
                for view in list(part.users):
                    _set_dim(view, 2, heads[part.args[1]], mine[part.args[1]])
            _set_dim(row.args[0], -1, hq * dh, lq * dh)  # o_proj's input: (B, T, Hq*Dh)
        else:
            split.args = (split.args[0], [inter // tp] * 2, *split.args[2:])
        _reduce_after(gm, row)
        count += 1
    require("tensor_parallel", count, "fused q/k/v and gate/up projections (fuse_projections)")
    if lm_head == "vocab":
        count += _shard_lm_head(gm, model, tp, rank, shards)
    _shard_caches(gm, hkv, lkv)
    for sdpa in [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]:
        # what the model passes (q heads != kv heads), at this rank's head counts
        sdpa.kwargs = {**sdpa.kwargs, "enable_gqa": lq != lkv}
    _propagate(gm)
    record(gm, "tensor_parallel", count)
    return finish(gm)


def _shard(gm: fx.GraphModule, shards: dict, target: str, dim: int, pick, tp: int, rank: int) -> str:
    """The name of weight `target`'s shard parameter along `dim` (`pick(r)`: the indices rank r
    keeps), made once per graph module: every rank's tensor in `shards`, this rank's on `gm`."""
    name = "tp__" + target.replace(".", "_")
    if name not in shards:
        full = get_attr_path(gm, target).detach()
        shards[name] = [full.index_select(dim, torch.tensor(pick(r), device=full.device)) for r in range(tp)]
        set_attr_path(gm, name, torch.nn.Parameter(shards[name][rank], requires_grad=False))
    return name


def _shard_lm_head(gm: fx.GraphModule, model: ModelConfig, tp: int, rank: int, shards: dict) -> int:
    """The logits projection (a linear whose weight is vocab x hidden) with this rank's 1/tp of
    the vocabulary rows, its output all-gathered back to the whole vocabulary, so acceptance
    and sampling (top-k, top-p over every token) run on identical logits on every rank. Only
    that use of the weight changes: a tied embedding keeps reading the whole matrix (a row
    gather, a few rows per step). Returns the number of projections sharded (0 in graphs
    without logits)."""
    V, H, per = model.vocab_size, model.hidden_size, model.vocab_size // tp
    count = 0
    for lin in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]:
        w = lin.args[1]  # models.llama's lm_head, or the embedding it is tied to
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target in LOGITS_WEIGHTS
                and tuple(get_attr_path(gm, w.target).shape) == (V, H)) or len(lin.args) > 2:
            continue
        name = _shard(gm, shards, w.target, 0, lambda r: list(range(r * per, (r + 1) * per)), tp, rank)
        with gm.graph.inserting_before(lin):  # this use only: a tied embedding keeps the whole matrix
            lin.replace_input_with(w, attr_node(gm, name))
        if not w.users:  # untied: the whole matrix is no longer read (a tied embedding still reads it)
            gm.graph.erase_node(w)
        users = list(lin.users)
        with gm.graph.inserting_before(lin.next):
            out = call_traced(gm, partial(gather_last, tp=tp), lin)
        for u in users:
            u.replace_input_with(lin, out)
        count += 1
    return count


def _set_dim(node: fx.Node, dim: int, old: int, new: int) -> None:
    if node.target not in _SHAPED and node.target != aten.expand.default:
        raise SpecCompileError(f"tensor_parallel: {node} is not a view, reshape or expand; the exported "
                               "graph does not have the form this pass rewrites")
    shape = list(node.args[1])
    if shape[dim] != old:
        raise SpecCompileError(f"tensor_parallel: {node} has size {shape[dim]} at dim {dim}, expected {old}")
    shape[dim] = new
    node.args = (node.args[0], shape, *node.args[2:])


def _next_linear(split: fx.Node) -> fx.Node:
    """The one projection the split's outputs reach first (o_proj from q/k/v, down from gate/up)."""
    seen, todo, found = set(), list(split.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target == aten.linear.default:
            found.add(n)
        else:
            todo.extend(n.users)
    if len(found) != 1:
        raise SpecCompileError(f"tensor_parallel: {split} reaches {len(found)} projections, expected one")
    return found.pop()


def _reduce_after(gm: fx.GraphModule, lin: fx.Node) -> None:
    """linear(x, W, b) -> all_reduce(linear(x, W)) + b: the bias is added once, not per rank."""
    x, w, *rest = lin.args
    bias = rest[0] if rest else None
    users = list(lin.users)
    with gm.graph.inserting_before(lin.next):
        if bias is None:
            out = call_traced(gm, all_reduce, lin)
        else:
            lin.args = (x, w)
            out = call_traced(gm, lambda y, b: all_reduce(y) + b, lin, bias)
    for u in users:
        u.replace_input_with(lin, out)


def _shard_caches(gm: fx.GraphModule, hkv: int, local: int) -> None:
    """Cache inputs (B, Hkv, S, Dh) -> (B, local, S, Dh); the model's cache writes expand their
    index to (B, Hkv, T, Dh)."""
    for name, ph in placeholders(gm).items():
        if name[:2] not in ("k_", "v_"):
            continue
        v = ph.meta["val"]
        with fake_mode(gm):
            ph.meta["val"] = torch.empty((v.shape[0], local, *v.shape[2:]), dtype=v.dtype, device=v.device)
        for u in list(ph.users):
            if u.target == aten.scatter.src and u.args[0] is ph and u.args[2].target == aten.expand.default:
                _set_dim(u.args[2], 1, hkv, local)


def _propagate(gm: fx.GraphModule) -> None:
    """Recompute every node's meta["val"] at the new sizes (a size mismatch raises here)."""
    mode = fake_mode(gm)
    with mode:
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                n.meta["val"] = mode.from_tensor(get_attr_path(gm, n.target), static_shapes=True)
            elif n.op == "call_function":
                args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
                try:
                    n.meta["val"] = n.target(*args, **kwargs)
                except Exception as e:
                    raise SpecCompileError(f"tensor_parallel: {n} ({n.target}) fails at the sharded sizes "
                                           f"({e}); the exported graph has a head-count size this pass "
                                           "does not rewrite") from None
