"""--tree auto's cost model against real engines: predicted vs measured step time per tree.

Times the cost model the compiler uses (spec_compiler/tree_choice.py: the target's and the
draft's eager forwards on this device) for the draft's candidate trees, prints the candidates
with their expected tokens/call (the draft's accept.json), predicted step ms and expected
tokens/s, and the choice. For each engine given (built with --tree NAME), measures its step
time (ms per speculative step, prefill excluded, the runtime's step API) and tokens per call on
the first N dev prompts, beside the prediction for its tree: the model's error. Writes JSON and
prints a table last.

    python bench/bench_tree_choice.py [--engines engines/a,engines/b] [--n 4] [--device cuda]
        [--model models/SmolLM2-135M-Instruct | --shape smollm2] [--out bench/results/tree_choice.json]

--shape smollm2 uses random weights of SmolLM2's shapes (a GPU machine without the checkpoint):
timing needs the shapes, acceptance comes from the draft's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from spec_compiler import engine_format as fmt
from spec_compiler.tree_choice import CostModel, auto_tree
from spec_compiler.trees import TreeSpec

REPO = Path(__file__).resolve().parents[1]


def modules(args):
    """(target, draft) on the device in the engine's dtype: the real pair, or random weights
    of SmolLM2's shapes with a one-layer draft and a hot vocabulary of the shipped draft's size."""
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.shape is None:
        from spec_compiler.loading import load_draft, load_target

        target = load_target(args.model, dtype).to(args.device)
        return target, load_draft(args.draft, target, dtype).to(args.device), dtype
    sys.path.insert(0, str(REPO / "bench"))
    from bench_decode import SHAPES, hot_draft, random_modules

    target, draft, dcfg = random_modules(SHAPES[args.shape], device=args.device)
    cfg = json.loads((args.draft / "config.json").read_text())
    if cfg.get("draft_vocab_size"):
        draft, _ = hot_draft(target, draft, dcfg, cfg["draft_vocab_size"])
    return target.to(getattr(torch, dtype)), draft.to(getattr(torch, dtype)), dtype


def engine_steps(engine_dir: Path, prompts: list[str], new: int) -> dict:
    """Median ms per step over the prompts (steps only) and tokens per verify call."""
    from spec_compiler.runtime import Engine

    eng = Engine.load(engine_dir)
    per, emitted, calls = [], 0, 0
    sync = torch.cuda.synchronize if eng.spec.device.startswith("cuda") else (lambda: None)
    for text in prompts:
        eng.start(eng.encode_prompt(text), new)
        sync()
        t, n = time.perf_counter(), 0
        while eng.running():
            eng.step()
            n += 1
        sync()
        per.append(1000 * (time.perf_counter() - t) / n)
        r = eng.result()
        emitted, calls = emitted + sum(r.accept_lengths), calls + r.verify_calls
    return {"ms_per_step": statistics.median(per), "tokens_per_call": emitted / calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models/SmolLM2-135M-Instruct")
    ap.add_argument("--shape", choices=("smollm2",), default=None)
    ap.add_argument("--draft", type=Path, default=REPO / "drafts/smollm2-eagle-wide-eagle3")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--engines", default="", help="comma-separated engine dirs to measure")
    ap.add_argument("--n", type=int, default=4, help="dev prompts per engine")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/tree_choice.json")
    args = ap.parse_args(argv)

    fallback, chooser = auto_tree(args.draft)
    if chooser is None:
        raise SystemExit(f"{args.draft} has no usable accept.json (spec-fit-tree writes it)")
    engines = [Path(d) for d in args.engines.split(",") if d]
    trees = {d: TreeSpec.from_json(json.loads((d / fmt.MANIFEST).read_text())["tree"]) for d in engines}
    # The engines' trees join the candidates, so their sizes are timed too.
    chooser = dataclasses.replace(chooser, extra=(*chooser.extra, *trees.values()))
    target, draft, dtype = modules(args)
    tree, record = chooser.choose(target, draft, args.max_seq_len,
                                  lambda d: fmt.min_capacity(64, d), lambda s: print(s, flush=True))
    del target, draft
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "dtype": dtype, "weights": args.shape or "real",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tree_choice": record,
           "engines": []}
    cost = CostModel(*({int(k): v for k, v in record["cost_model"][f].items()}
                       for f in ("target_ms", "draft_ms")))
    prompts = [json.loads(x)["prompt"] for x in
               (REPO / "spec_compiler/data/prompts_dev.jsonl").read_text().splitlines()[:args.n]]
    for d, t in trees.items():
        r = {"engine": str(d), "tree": t.name, "nodes": t.n_nodes,
             **engine_steps(d, prompts, args.max_new_tokens), "predicted_ms": cost.step_ms(t),
             "expected_tokens_per_call": chooser.table.expected_tpc(t)}
        r["measured_over_predicted"] = r["ms_per_step"] / r["predicted_ms"]
        r["tokens_per_s"] = 1000 * r["tokens_per_call"] / r["ms_per_step"]
        res["engines"].append(r)
        print(json.dumps(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))

    print(f"\n{res['device']}, {dtype}, {res['threads']} threads; cost model: target ms "
          f"{record['cost_model']['target_ms']}, draft ms {record['cost_model']['draft_ms']}")
    print("candidate | nodes | expected tokens/call | predicted step ms | expected tokens/s")
    for r in record["candidates"][:12]:
        print(f"{r['name']} | {r['nodes']} | {r['expected_tokens_per_call']:.3f} | "
              f"{r['predicted_step_ms']:.1f} | {r['expected_tokens_per_s']:.1f}")
    print(f"choice: {tree.name} ({tree.n_nodes} nodes)")
    if res["engines"]:
        print("\nengine tree | nodes | measured ms/step | predicted ms | measured/predicted | "
              "tokens/call measured (table) | tokens/s")
        for r in res["engines"]:
            print(f"{r['tree']} | {r['nodes']} | {r['ms_per_step']:.1f} | {r['predicted_ms']:.1f} | "
                  f"{r['measured_over_predicted']:.2f} | {r['tokens_per_call']:.2f} "
                  f"({r['expected_tokens_per_call']:.2f}) | {r['tokens_per_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
