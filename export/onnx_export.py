"""Rewritten GraphModule -> an ONNX model (the onnx backend). The only module that imports onnx.

The graphs come here in functional form (`return_cache_rows` instead of `static_kv_cache`: ONNX
has no in-place writes): they take the caches as inputs and return only the rows they write and
the slots those rows go to, which the runtime writes into its own cache buffers
(runtime/onnx_runtime.py). Weights are graph inputs, as for Inductor (`lift_weights`): the engine
keeps them once, in the shared weights.safetensors, and the runtime binds the loaded tensors'
memory to every session. Only the small compile-time constants (tree masks and indices, rope
frequencies) are initializers inside each .onnx file. Every shape is static (the engine's
buckets), so the graphs are also what TensorRT's ONNX parser takes (not tested here).

`spec::tree_attention` is translated to standard ONNX operators (`tree_attention_onnx`,
registered in torch.onnx's `custom_translation_table`, as are `cumprod`, which ONNX lacks, and
`linear`, as Gemm over the weight as stored): no custom-domain node is left.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx

from spec_compiler.errors import SpecCompileError

OPSET = 18
ONNX_EXTRA = "pip install .[onnx]"


def check_onnx(cfg) -> None:
    """Before a compile with --backend onnx: onnx and onnxscript (export) and onnxruntime (what
    runs the engine) import, and the dtype is one the runtime binds (no bfloat16 in numpy)."""
    import importlib

    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SpecCompileError(f"--backend onnx needs {', '.join(missing)}, which is not installed; "
                               f"install the onnx extra: {ONNX_EXTRA}")
    if cfg.dtype not in ("float32", "float16"):
        raise SpecCompileError(f"--backend onnx --dtype {cfg.dtype}: the ONNX Runtime engine runs "
                               "float32 or float16; pass --dtype float32")


def tree_attention_onnx(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale: float):
    """`spec::tree_attention` in ONNX operators, exact up to float rounding: one softmax over the
    scores of [cache prefix | tree] instead of two passes merged by log-sum-exp (the same
    normaliser; every tree row sees at least itself, so no row is empty). The prefix is the filled
    part of the caches, slots [0, max(cache_len, 1)) (what the CPU reference reads; an in-graph
    Slice, so reading the cache follows the context, not the capacity), masked per row by its
    cache_len. Only the scores (T x slots per head) are concatenated, never the cache. Grouped
    queries as in the reference: the g query heads of a kv head are g*T rows against its keys.
    Computes in float32."""
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op

    B, Hq, T, Dh = q.shape
    Hkv = k_cache.shape[1]
    g = Hq // Hkv
    axis2, axis3 = op.Constant(value_ints=[2]), op.Constant(value_ints=[3])
    n = op.Max(op.ReduceMax(cache_len, keepdims=1), op.Constant(value_ints=[1]))  # (1,)
    zero = op.Constant(value_ints=[0])
    k_p = op.Cast(op.Slice(k_cache, zero, n, axis2), to=FLOAT.dtype)  # (B, Hkv, n, Dh)
    v_p = op.Cast(op.Slice(v_cache, zero, n, axis2), to=FLOAT.dtype)
    qg = op.Reshape(op.Cast(q, to=FLOAT.dtype), op.Constant(value_ints=[B, Hkv, g * T, Dh]))
    scale_c = op.Constant(value_float=scale)
    ninf = op.Constant(value_float=float("-inf"))
    s_p = op.Mul(op.MatMul(qg, op.Transpose(k_p, perm=[0, 1, 3, 2])), scale_c)  # (B, Hkv, gT, n)
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(n, zero), op.Constant(value_int=1))
    seen = op.Less(op.Unsqueeze(slots, zero), op.Unsqueeze(op.Cast(cache_len, to=INT64.dtype),
                                                           op.Constant(value_ints=[1])))  # (B, n)
    s_p = op.Where(op.Unsqueeze(seen, op.Constant(value_ints=[1, 2])), s_p, ninf)
    s_s = op.Mul(op.MatMul(qg, op.Transpose(op.Cast(k_new, to=FLOAT.dtype), perm=[0, 1, 3, 2])),
                 scale_c)  # (B, Hkv, gT, Tk)
    s_s = op.Where(op.Tile(tree_mask, op.Constant(value_ints=[g, 1])), s_s, ninf)  # rows (j, t)
    p = op.Softmax(op.Concat(s_p, s_s, axis=-1), axis=-1)
    big = op.Constant(value_ints=[2**62])
    o = op.Add(op.MatMul(op.Slice(p, zero, n, axis3), v_p),
               op.MatMul(op.Slice(p, n, big, axis3), op.Cast(v_new, to=FLOAT.dtype)))
    return op.CastLike(op.Reshape(o, op.Constant(value_ints=[B, Hq, T, Dh])), q)


def cumprod_onnx(x, dim: int, dtype=None):
    """`aten.cumprod` over a static length (ONNX has CumSum, no CumProd; torch's decomposition
    leaves a `prims.prod` that has no ONNX function): a chain of Muls, exact for integers (the
    accept epilogue's accepted-prefix lengths over a tree path of D + 1 nodes)."""
    from onnxscript import opset18 as op

    assert dtype is None, "cumprod_onnx: a dtype argument is not used by the engine graphs"
    dim = dim % len(x.shape)
    parts = [op.Slice(x, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]),
                      op.Constant(value_ints=[dim])) for i in range(x.shape[dim])]
    out = [parts[0]]
    for part in parts[1:]:
        out.append(op.Mul(out[-1], part))
    return op.Concat(*out, axis=dim)


def linear_onnx(x, weight, bias=None):
    """`aten.linear` as Gemm with transB: the weight (out, in) is read as it is stored. torch's
    own translation is MatMul(x, Transpose(weight)), and with the weights graph inputs (not
    initializers, which ONNX Runtime would fold) that transposes every weight on every call."""
    from onnxscript import opset18 as op

    x2 = op.Reshape(x, op.Constant(value_ints=[-1, x.shape[-1]]))  # (N, in)
    y = op.Gemm(x2, weight, transB=1) if bias is None else op.Gemm(x2, weight, bias, transB=1)
    return op.Reshape(y, op.Constant(value_ints=[*x.shape[:-1], weight.shape[0]]))


def translation_table() -> dict:
    import spec_compiler.ops.tree_attention  # noqa: F401  (registers the op)

    return {torch.ops.spec.tree_attention.default: tree_attention_onnx,
            torch.ops.aten.cumprod.default: cumprod_onnx, torch.ops.aten.linear.default: linear_onnx}


def export_onnx(gm: fx.GraphModule, example_inputs: list[torch.Tensor], out_path: Path) -> Path:
    """Export the (weight-lifted, functional) graph to `out_path` with torch.onnx (dynamo),
    inputs and outputs named as the graph names them (an output that has an input's name, verify's
    cache_len, gets `.out`: ONNX names each value once); checked with onnx.checker."""
    import onnx

    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    outs = [f"{o}.out" if o in names else o for o in gm.meta["output_names"]]
    gm.eval()  # an inference graph (no train-mode ops), and torch.onnx warns otherwise
    with torch.no_grad():
        prog = torch.onnx.export(gm, tuple(example_inputs), input_names=names,
                                 output_names=outs, opset_version=OPSET,
                                 dynamo=True, external_data=False,
                                 custom_translation_table=translation_table(), verbose=False)
    model = prog.model_proto
    custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:  # a torch op without an ONNX translation would leave its own domain
        raise SpecCompileError(f"onnx export: nodes of domains {custom} remain; this is a compiler bug")
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(out_path))
    return out_path
