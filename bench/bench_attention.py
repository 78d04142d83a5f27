"""Benchmark: two-pass tree attention (`spec::tree_attention`) vs one masked SDPA call.

The verify step's attention: T = 26 tree queries (EAGLE's mc_sim_7b_63) over [cache | tree] at
4k and 32k context, batch 1, bf16, for Llama-3.1-8B (32 q heads, 8 kv heads, head dim 128) and
SmolLM2-135M (9, 3, 64) shapes. Both sides read the same buffers, laid out as an engine keeps
them: the tree's K/V sit in the cache slots just past cache_len, so SDPA attends to
cache[:L + T] with a (T, L + T) boolean mask (prefix all visible, tree part = the tree mask),
while the op gets the prefix and the tree slots as two views of the same buffer.

Timing is `triton.testing.do_bench` (median, ms; it flushes L2 between runs), plus
`do_bench_cudagraph` (replayed as a CUDA graph, as an engine runs it). The prefix pass (split-K
kernel alone) is reported as achieved bandwidth, bytes of K + V read / time, next to a measured
device-to-device copy bandwidth ((read + write) / time of a 1 GiB `copy_`): the prefix's ceiling.

    python bench/bench_attention.py [--out bench/results/attention.json]

Writes JSON to --out and prints a table last. Needs CUDA; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name -> (q heads, kv heads, head dim)
    "llama-3.1-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
SDPA_BACKENDS = ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH")


def copy_bandwidth(do_bench, n_bytes=1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def bench_case(do_bench, graph_bench, model, ctx, tree_mask, dtype=torch.bfloat16):
    from spec_compiler.kernels.tree_attention import prefix_partials
    from spec_compiler.ops.tree_attention import tree_attention  # noqa: F401  (registers the op)

    Hq, Hkv, Dh = SHAPES[model]
    T = tree_mask.shape[0]
    S = ctx + T  # capacity: the context plus the tree's scratch slots
    scale = 1 / math.sqrt(Dh)
    dev = dict(device="cuda", dtype=dtype)
    q = torch.randn(1, Hq, T, Dh, **dev)  # (B, Hq, T, Dh)
    k_buf = torch.randn(1, Hkv, S, Dh, **dev)  # (B, Hkv, S, Dh): cache, then the tree's K
    v_buf = torch.randn(1, Hkv, S, Dh, **dev)
    k_new, v_new = k_buf[:, :, ctx:], v_buf[:, :, ctx:]  # (B, Hkv, T, Dh) views
    cache_len = torch.tensor([ctx], device="cuda")  # (B,)
    mask_dev = tree_mask.cuda()  # (T, T)
    full_mask = torch.cat([torch.ones(T, ctx, dtype=torch.bool), tree_mask], 1).cuda()  # (T, S)

    two_pass = lambda: torch.ops.spec.tree_attention(  # noqa: E731
        q, k_buf, v_buf, k_new, v_new, cache_len, mask_dev, scale)
    prefix = lambda: prefix_partials(q, k_buf, v_buf, cache_len, scale)  # noqa: E731
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k_buf, v_buf, attn_mask=full_mask, scale=scale, enable_gqa=True)

    err = ((two_pass().float() - sdpa().float()).norm() / sdpa().float().norm()).item()
    kv_bytes = 2 * Hkv * ctx * Dh * q.element_size()  # K + V of the prefix
    row = {
        "model": model, "context": ctx, "tree_nodes": T, "q_heads": Hq, "kv_heads": Hkv,
        "head_dim": Dh, "batch": 1, "dtype": str(dtype).removeprefix("torch."),
        "n_splits": prefix()[1].shape[2], "rel_err_vs_sdpa": err,
        "two_pass_ms": do_bench(two_pass), "prefix_ms": do_bench(prefix), "sdpa_ms": do_bench(sdpa),
        "prefix_kv_bytes": kv_bytes,
    }
    row["prefix_gbps"] = kv_bytes / (row["prefix_ms"] * 1e-3) / 1e9
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["two_pass_ms"]
    # Replayed as a CUDA graph, as an engine runs it: no Python launch overhead (L2 not flushed).
    row["two_pass_graph_ms"] = _or_none(lambda: graph_bench(two_pass))
    row["sdpa_graph_ms"] = _or_none(lambda: graph_bench(sdpa))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    row["sdpa_backend_ms"] = {}
    for name in SDPA_BACKENDS:  # which backends accept a bool mask + GQA, and how fast they are
        def run(name=name):
            with sdpa_kernel(getattr(SDPBackend, name)):
                sdpa()
                return do_bench(sdpa)
        row["sdpa_backend_ms"][name.lower()] = _or_none(run)
    return row


def _or_none(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA explains at length why a backend declined
        try:
            return fn()
        except RuntimeError as e:  # a backend that rejects bool mask + GQA, or a failed capture
            print(f"  ({str(e).splitlines()[0][:100]})", file=sys.stderr)
            return None


def format_table(rows, copy_gbps) -> str:
    head = (f"{'model':<14}{'ctx':>7}{'splits':>7}{'two-pass ms':>13}{'prefix ms':>11}"
            f"{'sdpa ms':>9}{'speedup':>9}{'graph 2p/sdpa ms':>18}{'prefix GB/s':>13}"
            f"{'% of copy':>11}{'rel err':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<14}{r['context']:>7}{r['n_splits']:>7}{r['two_pass_ms']:>13.4f}"
            f"{r['prefix_ms']:>11.4f}{r['sdpa_ms']:>9.4f}{r['speedup_vs_sdpa']:>8.2f}x"
            f"{_ms(r['two_pass_graph_ms']):>9}/{_ms(r['sdpa_graph_ms']):<8}"
            f"{r['prefix_gbps']:>13.0f}{100 * r['prefix_gbps'] / copy_gbps:>10.1f}%"
            f"{r['rel_err_vs_sdpa']:>10.1e}")
    lines.append(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    return "\n".join(lines)


def _ms(x):
    return "-" if x is None else f"{x:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attention.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tree", default="mc_sim_7b_63")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing measured, nothing written.", file=sys.stderr)
        return 1

    from functools import partial

    from triton.testing import do_bench, do_bench_cudagraph

    from spec_compiler.trees import resolve_tree

    bench = partial(do_bench, warmup=25, rep=200, return_mode="median")
    graph_bench = partial(do_bench_cudagraph, rep=200, return_mode="median")
    tree_mask = resolve_tree(args.tree).tree_mask()
    copy_gbps = copy_bandwidth(bench)
    rows = [bench_case(bench, graph_bench, m, c, tree_mask)
            for m in args.models for c in args.contexts]
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(),
        "tree": args.tree,
        "timing": "ms, median: *_ms triton.testing.do_bench, *_graph_ms do_bench_cudagraph",
        "copy_gbps": copy_gbps, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}; wrote {args.out}")
    print(format_table(rows, copy_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
