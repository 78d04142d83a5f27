"""Cold-start benchmark: how long a fresh process takes to load an engine and run its first step.

Each measurement is a new Python process with an empty Inductor cache (its own
TORCHINDUCTOR_CACHE_DIR and TMPDIR), timed from after `import torch, transformers` to a ready
engine (`Engine.load`), with the page cache warm (one untimed load first), as a server restart
or a `spec-run` sees it. `Engine.load_seconds` splits the time into check (manifest + every file
hashed for the fingerprint), weights (read and placed on the device), graphs (AOTInductor
packages) and state. The first generated step (CUDA-graph capture included) is reported apart.

    python bench/bench_load.py --shapes smollm2,llama8b [--device cuda] [--runs 3]
                               [--out bench/results/load.json]
    python bench/bench_load.py --engine ENGINE_DIR      (an engine you built)

Random bf16 weights of each model shape (bench_decode.SHAPES); smollm2 builds the whole engine
(prefill, verify, draft_prefill, draft; mc_sim_7b_63 with a one-layer draft), llama8b the
non-speculative decode step alone (verify: its 16 GB of weights are what a load reads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, transformers
t = time.perf_counter()
from spec_compiler.runtime import Engine
e = Engine.load(sys.argv[1])
load = time.perf_counter() - t
t = time.perf_counter()
if "prefill" in e.graphs:
    e.start([1, 2, 3, 4])
else:  # a step-only engine (bench_decode builds those): a synthetic context
    e.start_synthetic(4)
e.step()
if torch.cuda.is_available():
    torch.cuda.synchronize()
print(json.dumps({"load_s": load, "first_step_s": time.perf_counter() - t, **e.load_seconds}))
"""


def measure(engine: Path, runs: int) -> list[dict]:
    out = []
    for i in range(runs + 1):  # the first run warms the page cache, untimed
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "TMPDIR": tmp}
            r = subprocess.run([sys.executable, "-c", CHILD, str(engine)], capture_output=True,
                               text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"bench_load: loading {engine} failed:\n{r.stderr[-3000:]}")
        if i:
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def build(shape: str, root: Path, device: str) -> Path:
    from bench_decode import SHAPES, build_engine_dir, random_modules

    from spec_compiler.trees import chain, resolve_tree

    m = SHAPES[shape]
    target, draft, dcfg = random_modules(m, device=device)
    if shape == "smollm2":  # the whole speculative engine
        return build_engine_dir(m, target, draft, dcfg, resolve_tree("mc_sim_7b_63"), None, root, shape,
                                device=device)
    # Larger shapes: the decode step alone (its weights are what a load reads; compiling the
    # other graphs of an 8B engine would take the GPU machine ten more minutes).
    return build_engine_dir(m, target, draft, dcfg, chain(0), ["verify"], root, shape, device=device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2,llama8b")
    ap.add_argument("--engine", type=Path, default=None, help="measure this engine instead")
    ap.add_argument("--device", default=None, help="cuda if there is a GPU, else cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/load.json")
    args = ap.parse_args(argv)
    import torch

    from bench_pair import cpu_name

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "runs": args.runs,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(), "engines": []}
    with tempfile.TemporaryDirectory() as tmp:
        todo = [("engine", args.engine)] if args.engine else [(s, None) for s in args.shapes.split(",")]
        for name, path in todo:
            path = path or build(name, Path(tmp), args.device)
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            runs = measure(path, args.runs)
            best = min(runs, key=lambda r: r["load_s"])
            res["engines"].append({"name": name, "bytes": size, "runs": runs, "best": best})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}, fresh process, empty Inductor cache, warm page cache, best of {args.runs}")
    print(" | ".join(("engine", "GB", "load s", "check s", "weights s", "graphs s", "state s", "first step s")))
    for e in res["engines"]:
        b = e["best"]
        print(" | ".join([e["name"], f"{e['bytes'] / 1e9:.2f}", f"{b['load_s']:.2f}", f"{b['check']:.2f}",
                          f"{b['weights']:.2f}", f"{b['graphs']:.2f}", f"{b['state']:.2f}",
                          f"{b['first_step_s']:.2f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
