"""Where the lowering time of one step graph goes: one graph of a random-weight model (bench_decode's
shapes) exported, rewritten and lowered with Inductor in this process under cProfile. Prints the
wall time, Inductor's own phase times, and the functions with the most cumulative time among
those that mark a phase (codegen, C++ and Triton compiles, kernel benchmarking, scheduling), so
a change to the compile settings can be judged by what it saves. Writes JSON (--out).

    python bench/profile_lowering.py [--shape llama8b] [--graph verify] [--batch 1]
                                     [--tree fitted-16|chain-0] [--device cuda]
                                     [--config aot_inductor.compile_wrapper_opt_level=O0 ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPES, random_modules  # noqa: E402

from spec_compiler.config import CompileConfig  # noqa: E402
from spec_compiler.export import lower  # noqa: E402
from spec_compiler.pipeline import compile_modules  # noqa: E402
from spec_compiler.tree_choice import AcceptTable  # noqa: E402
from spec_compiler.trees import chain  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHASES = ("cpp_builder", "compile_file", "run_command_and_check", "triton.compiler", "benchmark",
          "autotune", "codegen", "scheduler", "lowering", "graph.run", "fx_codegen_and_compile",
          "_compile_fx_inner", "aot_autograd", "export", "async_compile", "wait")


def parse_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--graph", default="verify")
    ap.add_argument("--batch", type=int, default=1, help="the batch bucket the graph is built for")
    ap.add_argument("--tree", default="fitted-16", help="fitted-N (the shipped draft's table) or chain-K")
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--config", nargs="*", default=[], help="extra Inductor settings, key=value")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    m = SHAPES[args.shape]
    target, draft, dcfg = random_modules(m, device=args.device)
    dtype = "bfloat16" if args.device == "cuda" else "float32"  # as the engines are built
    target, draft = target.to(getattr(torch, dtype)), draft.to(getattr(torch, dtype))
    kind, _, n = args.tree.partition("-")
    tree = (chain(int(n)) if kind == "chain" else
            AcceptTable.read(REPO / "bench/tables/smollm2-eagle-h100.accept.json").fitted(int(n)))
    cfg = CompileConfig(model=m, draft=dcfg if tree.n_nodes > 1 else None, tree=tree, max_seq_len=1024,
                        dtype=dtype, device=args.device, prefill_chunk=64, backend="inductor",
                        batch_size=args.batch, sampling=False)
    extra = parse_config(args.config)
    lower.INDUCTOR_CONFIGS.update(extra)
    name = args.graph if args.batch == 1 else f"{args.graph}.b{args.batch}"
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prof.enable()
        compile_modules(cfg, target, draft if cfg.draft is not None else None,
                        Path(tmp) / "engine", progress=lambda s: print("  " + s, flush=True),
                        graphs=[args.graph], jobs=1)
        prof.disable()
        wall = time.perf_counter() - t
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, _, tt, ct, _) in stats.stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{func}"
        if any(p in where for p in PHASES):
            rows.append((ct, tt, where))
    rows.sort(reverse=True)
    print(f"\n{name} of {args.shape} ({tree.name}, {args.device}), settings {extra or 'default'}: "
          f"{wall:.1f} s wall (export, passes and lowering, one process)")
    print(f"{'cumulative s':>13} {'own s':>8}  function")
    for ct, tt, where in rows[:args.top]:
        print(f"{ct:13.1f} {tt:8.1f}  {where}")
    try:
        from torch._dynamo.utils import compile_times
        print(compile_times(repr="str"))
    except Exception as e:  # its format changes between versions
        print(f"(no Inductor phase times: {e})")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    print(buf.getvalue()[-4000:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"graph": name, "shape": args.shape, "tree": tree.name,
                                        "device": args.device, "settings": extra, "wall_s": round(wall, 1),
                                        "torch": torch.__version__,
                                        "top": [{"cumulative_s": round(c, 2), "own_s": round(o, 2), "function": w}
                                                for c, o, w in rows[:args.top]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
