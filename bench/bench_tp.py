"""Tensor parallelism at batch 1: TP 1 vs TP N on one shape, one run per degree (issue 15).

Per degree (and at TP > 1 per lm_head layout, --lm-head: replicated on every rank, or sharded by
vocabulary with an all-gather of the logits), random weights, a 128-token context:
  - non-speculative decode ms/token (a chain-0 engine's step: the verify graph at T = 1)
  - the speculative step (mc_sim_7b_63: draft + verify + accept, replicated draft)
  - the all-reduces of one step measured alone, in the same run: 2 per layer, (1, T, hidden)
    in the engine's dtype, T = 1 (decode) and T = the tree's nodes (verify)
  - with the vocabulary-sharded lm_head, the logits' all-gather of one decode step alone
  - the per-GPU roofline: the bytes each rank reads per decode step (its shard of the sharded
    weights, the lm_head or its shard, the norms, its kv heads' 128-token cache) over a measured
    device-to-device copy bandwidth, plus the measured collectives' time. Issue 15's goal: TP 2
    decode within 1.15x of that.
The engines are compiled once per degree (the ranks share the artifacts); the ranks run as
child processes (`runtime.tp.launch`, this file's `rank_main`), rank 0 reports. Shapes: llama8b,
llama70b (`--layers K` keeps K layers, e.g. to fit TP 1 on one GPU), and tiny for a CPU smoke
run of the script itself (`--device cpu`: gloo, wall-clock timing). Writes JSON, prints a table.

    python bench/bench_tp.py [--shape llama8b] [--tp 1,2] [--lm-head replicated,vocab] [--layers K] [--device cuda]
                             [--engines DIR [--build-only]] [--out bench/results/tp.json]
    python bench/bench_tp.py --shape tiny --tp 1,2 --device cpu --out /tmp/tp_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_decode import CTX, SHAPES as DECODE_SHAPES, random_modules, timed as cuda_timed
from spec_compiler.config import CompileConfig, ModelConfig
from spec_compiler.passes.tensor_parallel import local_kv_heads
from spec_compiler.trees import chain, resolve_tree

SHAPES = {
    "llama8b": DECODE_SHAPES["llama8b"],
    "llama70b": dataclasses.replace(DECODE_SHAPES["llama8b"], hidden_size=8192, intermediate_size=28672,
                                    n_layers=80, n_heads=64, n_kv_heads=8),
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, n_layers=2, n_heads=8,
                        n_kv_heads=4, head_dim=16, eos_token_ids=(2,)),
}
TREE = "mc_sim_7b_63"
GOAL = 1.15  # TP decode within this of (per-GPU roofline + all-reduce)


def timed(fn, device: str, iters: int = 50, warmup: int = 5) -> float:
    """Median ms of fn() (CUDA events on a GPU: bench_decode's; wall clock on the CPU)."""
    if device == "cuda":
        return cuda_timed(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(device: str) -> float:
    """Copy GB/s counting bytes read + written (256 MiB on the CPU, 1 GiB on a GPU)."""
    n = 1 << (30 if device == "cuda" else 28)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / timed(lambda: y.copy_(x), device, iters=10, warmup=2) / 1e6


def step_ms(engine, device: str) -> float:
    """One step (a CUDA-graph replay on a GPU) from a random CTX-token context."""
    engine.start_synthetic(CTX)
    engine.capture()
    engine.start_synthetic(CTX)
    return timed(engine.step, device)


def all_reduce_ms(m: ModelConfig, dtype: torch.dtype, tokens: int, device: str) -> float:
    """The all-reduces of one step alone: 2 per layer of (1, tokens, hidden)."""
    import torch.distributed as dist

    x = torch.randn(1, tokens, m.hidden_size, dtype=dtype, device=device)
    if dist.get_world_size() == 1:
        return 0.0

    def step():
        for _ in range(2 * m.n_layers):
            dist.all_reduce(x)
    return timed(step, device, iters=20)


def rank_main(argv: list[str]) -> int:
    """One rank: time the decode and speculative engines, the all-reduces alone and the copy
    bandwidth; rank 0 writes them to argv[3] (JSON)."""
    from spec_compiler.runtime import Engine
    from spec_compiler.runtime import tp as ranks

    decode_dir, spec_dir, device, out, tp = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    lm_head = argv[5] if len(argv) > 5 else "replicated"
    rank = ranks.join(tp, device) if ranks.launched() else 0
    dev = "cuda" if device == "cuda" else "cpu"
    decode, spec = Engine.load(decode_dir), Engine.load(spec_dir)
    m, dtype = decode.spec.model, decode.spec.dtype
    r = {"decode_ms_per_token": step_ms(decode, dev), "spec_step_ms": step_ms(spec, dev)}
    if ranks.launched():
        r["all_reduce_decode_ms"] = all_reduce_ms(m, dtype, 1, dev)
        r["all_reduce_verify_ms"] = all_reduce_ms(m, dtype, spec.spec.tree.n_nodes, dev)
        if lm_head == "vocab":  # the logits' all-gather, (V/tp, 1) per rank in the engine's dtype
            import torch.distributed as dist

            part = torch.randn(m.vocab_size // tp, 1, dtype=dtype, device=dev)
            whole = torch.empty(m.vocab_size, 1, dtype=dtype, device=dev)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer torch: the former
            r["all_gather_decode_ms"] = timed(lambda: gather(whole, part), dev, iters=20)
    else:
        r["all_reduce_decode_ms"] = r["all_reduce_verify_ms"] = 0.0
    r["copy_gb_s"] = copy_bandwidth(dev)
    if rank == 0:
        Path(out).write_text(json.dumps(r))
    return 0


def rank_bytes(m: ModelConfig, tp: int, dtype_bytes: int, lm_head: str = "replicated") -> dict:
    """Bytes one rank reads per decode step: its shard of q/k/v, o, gate/up, down; the lm_head
    (replicated, or its 1/tp of the vocabulary rows) and the norms (the embedding is a row
    gather); its kv heads' cache."""
    hq, hkv, d, h, i = m.n_heads, m.n_kv_heads, m.head_dim, m.hidden_size, m.intermediate_size
    sharded = m.n_layers * (h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * i)
    head = m.vocab_size * h // (tp if lm_head == "vocab" else 1)
    replicated = (2 * m.n_layers + 1) * h
    kv_heads = local_kv_heads(hkv, tp)
    kv = 2 * m.n_layers * kv_heads * d * CTX
    return {"sharded": sharded * dtype_bytes // tp, "lm_head": head * dtype_bytes,
            "replicated": replicated * dtype_bytes, "kv": kv * dtype_bytes}


def build(m: ModelConfig, tp: int, root: Path, device: str, dtype: str,
          lm_head: str = "replicated", kinds: tuple[str, ...] = ("decode", "spec")) -> tuple[Path, Path]:
    """The decode (chain-0) and speculative engines of degree tp, compiled once (reused when
    root already holds them), with the step's graphs only (start_synthetic needs no prefill).
    `kinds`: build only these (two processes can build the two at once)."""
    from spec_compiler.pipeline import compile_modules

    tag = f"tp{tp}" + ("_vocab" if lm_head == "vocab" else "")
    dirs = root / f"{tag}_decode", root / f"{tag}_spec"
    if all((d / "manifest.json").is_file() for d in dirs):
        return dirs
    target, draft, dcfg = random_modules(m, device=device)
    if dtype == "float32":
        target, draft = target.float(), draft.float()
    for d, tree, kind in zip(dirs, (chain(0), resolve_tree(TREE)), ("decode", "spec")):
        if (d / "manifest.json").is_file() or kind not in kinds:
            continue
        spec = tree.n_nodes > 1
        cfg = CompileConfig(model=m, draft=dcfg if spec else None, tree=tree, max_seq_len=512, dtype=dtype,
                            device=device, prefill_chunk=64, sampling=False, tp=tp, tp_lm_head=lm_head)
        t = time.time()
        graphs = ["verify", "draft"] if spec else ["verify"]  # the step's graphs: no prefill is timed
        compile_modules(cfg, target, draft if spec else None, d, progress=lambda s: print("  " + s, flush=True),
                        graphs=graphs)
        print(f"  built {d.name} in {time.time() - t:.0f} s", flush=True)
    return dirs


def bench_degree(m: ModelConfig, tp: int, root: Path, device: str, dtype: str, lm_head: str = "replicated") -> dict:
    from spec_compiler.runtime.tp import launch

    print(f"== TP {tp}, lm_head {lm_head}", flush=True)
    decode_dir, spec_dir = build(m, tp, root, device, dtype, lm_head)
    out = root / f"{decode_dir.name}.json"
    args = [str(decode_dir), str(spec_dir), device, str(out), str(tp), lm_head]
    if tp == 1:
        rank_main(args)
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
        if launch("bench_tp:rank_main", args, tp, device) != 0:
            raise SystemExit(f"TP {tp}: a rank failed")
    r = {"tp": tp, "lm_head": lm_head, **json.loads(out.read_text())}
    nbytes = rank_bytes(m, tp, 2 if dtype == "bfloat16" else 4, lm_head)
    r["rank_bytes"] = nbytes
    r["roofline_ms"] = sum(nbytes.values()) / r["copy_gb_s"] / 1e6
    r["roofline_plus_all_reduce_ms"] = r["roofline_ms"] + r["all_reduce_decode_ms"] + r.get("all_gather_decode_ms", 0.0)
    r["decode_over_bound"] = r["decode_ms_per_token"] / r["roofline_plus_all_reduce_ms"]
    return r


def table(res: dict) -> str:
    rows = [("TP lm_head", "decode ms/tok", "spec step ms", "AR decode ms", "AR verify ms", "AG decode ms",
             "roofline ms", "+collectives ms", "decode / bound")]
    for r in res["degrees"]:
        rows.append((f"{r['tp']} {r.get('lm_head', 'replicated')}", f"{r['decode_ms_per_token']:.3f}",
                     f"{r['spec_step_ms']:.3f}", f"{r['all_reduce_decode_ms']:.3f}",
                     f"{r['all_reduce_verify_ms']:.3f}", f"{r.get('all_gather_decode_ms', 0.0):.3f}",
                     f"{r['roofline_ms']:.3f}", f"{r['roofline_plus_all_reduce_ms']:.3f}",
                     f"{r['decode_over_bound']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([f"{res['shape']} ({res['layers']} layers, {res['dtype']}, {res['device']}), "
                      f"batch 1, context {CTX}; goal: TP > 1 decode within {GOAL}x of roofline + collectives",
                      *lines])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--tp", default="1,2", help="degrees, comma-separated (default 1,2)")
    ap.add_argument("--lm-head", default="replicated,vocab",
                    help="at TP > 1, the lm_head layouts to compare (default both; TP 1 is replicated)")
    ap.add_argument("--layers", type=int, default=None, help="keep the first K layers (e.g. 70B at TP 1)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--engines", type=Path, default=None, help="keep (and reuse) the engines here")
    ap.add_argument("--out", default="bench/results/tp.json")
    ap.add_argument("--build-only", action="store_true", help="compile the engines under --engines, time nothing")
    ap.add_argument("--only", choices=("decode", "spec"), default=None,
                    help="with --build-only, that engine alone (two processes can build the two at once)")
    args = ap.parse_args(argv)
    if args.build_only and args.engines is None:
        ap.error("--build-only needs --engines DIR")
    if args.only and not args.build_only:
        ap.error("--only needs --build-only (the timed run uses both engines)")
    m = SHAPES[args.shape]
    if args.layers is not None:
        m = dataclasses.replace(m, n_layers=args.layers)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    res = {"shape": args.shape, "layers": m.n_layers, "device": args.device, "dtype": dtype,
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "degrees": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.engines or Path(tmp)
        runs = [(tp, head) for tp in map(int, args.tp.split(","))
                for head in (args.lm_head.split(",") if tp > 1 else ["replicated"])]
        for tp, head in runs:
            if args.build_only:
                build(m, tp, root, args.device, dtype, head, (args.only,) if args.only else ("decode", "spec"))
                continue
            res["degrees"].append(bench_degree(m, tp, root, args.device, dtype, head))
            Path(args.out).write_text(json.dumps(res, indent=1))
    if not args.build_only:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
