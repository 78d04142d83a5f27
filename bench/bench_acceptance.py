"""Acceptance of a real target/draft pair: tokens per verify call on held-out prompts.

Chat template applied, stop at EOS, at most --max-new tokens, at each of --temperatures (0 is
greedy; a sampled run uses --top-p and seed --seed + prompt index). For each (draft, tree) an
engine is compiled (or --engine names a built one) and every prompt generated; reports aggregate
tokens per call (emitted by verify calls / verify calls), the share of outputs that repeat a
20-token sequence (a small model's loops inflate acceptance) and tokens per call without those
outputs, and end-to-end tokens/s (new tokens over the whole evaluation's wall time: prefill,
every step and the host's work, one prompt after another). A tree named `fitted-N` is each
draft's own: its acceptance table's best N-node tree (the draft's accept.json), with the tokens
per call that table expects. Writes JSON, prints a table last.

    python bench/bench_acceptance.py models/SmolLM2-135M-Instruct \
        --drafts drafts/smollm2-eagle-wide,drafts/smollm2-eagle-wide-eagle3 --trees auto,fitted-40,chain-5
    python bench/bench_acceptance.py models/SmolLM2-135M-Instruct --engine engines/smollm2-eagle3 \
        --temperatures 0,0.7,1.0 --top-p 0.9
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def repeats_ngram(ids: list[int], n: int = 20) -> bool:
    seen = set()
    for i in range(len(ids) - n + 1):
        g = tuple(ids[i:i + n])
        if g in seen:
            return True
        seen.add(g)
    return False


def evaluate(engine, prompts: list[str], max_new: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> dict:
    calls = emitted = new = 0
    calls_nr = emitted_nr = 0
    n_rep = 0
    # Untimed: one short generate at this temperature first, so that one-time costs (CUDA-graph
    # captures, the first call of each graph) are not in tokens/s.
    engine.generate(engine.encode_prompt(prompts[0]), max_new_tokens=16, temperature=temperature,
                    top_p=top_p, seed=seed if temperature > 0 else None)
    t = time.time()
    per = []
    for i, text in enumerate(prompts):
        ids = engine.encode_prompt(text)
        r = engine.generate(ids, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                            seed=seed + i if temperature > 0 else None)
        rep = repeats_ngram(r.output_ids)
        n_rep += rep
        calls += r.verify_calls
        emitted += sum(r.accept_lengths)
        new += len(r.output_ids)
        if not rep:
            calls_nr += r.verify_calls
            emitted_nr += sum(r.accept_lengths)
        per.append({"tpc": r.tokens_per_call, "n": len(r.output_ids), "repeats": rep, "stop": r.stop_reason})
    seconds = time.time() - t
    return {"tokens_per_call": emitted / max(calls, 1), "verify_calls": calls, "emitted": emitted,
            "repeat_share": n_rep / len(prompts), "tokens_per_call_no_repeats": emitted_nr / max(calls_nr, 1),
            "n_prompts": len(prompts), "seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds,
            "per_prompt": per,
            "temperature": temperature, "top_p": top_p if temperature > 0 else None}


def main(argv=None):
    from spec_compiler.runtime import Engine
    from spec_compiler.cli import compile_main

    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--drafts", default=None, help="comma-separated draft dirs")
    ap.add_argument("--engine", default=None, help="a built engine instead of --drafts/--trees")
    ap.add_argument("--temperatures", default="0", help="comma-separated; 0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.9, help="for temperatures > 0")
    ap.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    ap.add_argument("--trees", default="mc_sim_7b_63,chain-3,chain-5")
    ap.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "spec_compiler/data/prompts_dev.jsonl"))
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--draft-vocab", default="auto", help="spec-compile --draft-vocab (auto|full|N)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compile and evaluate this many (draft, tree) runs at once, each in its "
                         "own process (acceptance does not depend on it; timings do)")
    ap.add_argument("--out", default="bench/results/acceptance.json")
    args = ap.parse_args(argv)
    if (args.engine is None) == (args.drafts is None):
        ap.error("give --drafts (engines compiled here) or --engine (a built one)")
    temps = [float(x) for x in args.temperatures.split(",")]
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    prompts = prompts[: args.limit] if args.limit else prompts
    results = {"model": args.model_dir, "prompts": args.prompts, "n_prompts": len(prompts),
               "max_new": args.max_new, "device": args.device, "date": time.strftime("%Y-%m-%d"), "runs": []}
    pairs = [] if args.engine else [(d, t) for d in args.drafts.split(",") for t in args.trees.split(",")]
    if args.engine:
        engine = Engine.load(args.engine)
        m = engine.spec.manifest
        for temp in temps:
            r = evaluate(engine, prompts, args.max_new, temp, args.top_p, args.seed)
            r.update({"draft": args.engine, "tree": m["tree"]["name"], "tree_paths": m["tree"]["paths"],
                      "tree_nodes": len(m["tree"]["paths"]) + 1, "engine": args.engine,
                      "draft_vocab": "engine"})
            results["runs"].append(r)
            _report_row(r)
    if args.jobs > 1 and len(pairs) > 1:
        results["runs"] = _parallel(args, argv if argv is not None else sys.argv[1:], pairs)
        pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for draft, tree in pairs:
            out = Path(tmp) / f"{Path(draft).name}_{tree}".replace("/", "_")
            expected = _expected(draft, tree)
            cmd = [args.model_dir, "--draft", draft, "--out", str(out), "--tree", tree,
                   "--device", args.device, "--backend", args.backend, "--max-seq-len", "1024",
                   "--draft-vocab", args.draft_vocab]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            t = time.time()
            rc = compile_main(cmd)
            if rc:
                raise SystemExit(f"compile failed for {draft} {tree}")
            compile_s = time.time() - t
            engine = Engine.load(out)
            for temp in temps:
                r = evaluate(engine, prompts, args.max_new, temp, args.top_p, args.seed)
                t_used = json.loads((out / "manifest.json").read_text())["tree"]  # what --tree resolved to
                r.update({"draft": draft, "tree": tree, "tree_paths": t_used["paths"],
                          "tree_nodes": len(t_used["paths"]) + 1, "compile_s": compile_s,
                          "draft_vocab": args.draft_vocab, "expected_tokens_per_call": expected})
                if tree == "auto":  # what the engine chose
                    r["tree_chosen"] = t_used["name"]
                results["runs"].append(r)
                _report_row(r)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(_dumps(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(_dumps(results))
    print(f"\nacceptance on {len(prompts)} prompts ({args.prompts}), <= {args.max_new} new tokens")
    print("draft | tree | draft vocab | temperature (top-p) | tokens/call | repeat share | "
          "tokens/call without repeats | tokens/s")
    for r in results["runs"]:
        temp = "greedy" if not r.get("temperature") else f"{r['temperature']:g} ({r['top_p']:g})"
        tree = r["tree"] + (f" ({r['tree_chosen']})" if r.get("tree_chosen") else "")
        print(f"{Path(r['draft']).name} | {tree} | {r['draft_vocab']} | {temp} | {r['tokens_per_call']:.2f} | "
              f"{100 * r['repeat_share']:.0f}% | {r['tokens_per_call_no_repeats']:.2f} | {r['tokens_per_s']:.0f}")
    return 0


def _expected(draft: str, tree: str) -> float | None:
    """For `fitted-N` (spec-compile builds the draft's own fitted N-node tree, from its
    accept.json): the tokens per call that table expects; None for any other tree."""
    from spec_compiler.tree_choice import ACCEPT, AcceptTable, fitted_tree

    t = fitted_tree(tree, Path(draft))
    return None if t is None else round(AcceptTable.read(Path(draft) / ACCEPT).expected_tpc(t), 4)


def _dumps(results: dict) -> str:
    """The results as JSON, paths inside the repository written relative to it."""
    return json.dumps(results, indent=1).replace(str(Path(__file__).resolve().parents[1]) + "/", "")


def _report_row(r: dict) -> None:
    print(f"{Path(r['draft']).name:22s} {r['tree']:14s} T={r['temperature']:g} tpc {r['tokens_per_call']:.3f} "
          f"(no-repeat {r['tokens_per_call_no_repeats']:.3f}, repeats {100 * r['repeat_share']:.0f}%)", flush=True)


def _parallel(args, argv: list[str], pairs: list[tuple[str, str]]) -> list[dict]:
    """Each (draft, tree) in its own process of this script, `args.jobs` at a time."""
    import subprocess

    base = [a for a in argv]
    for flag in ("--drafts", "--trees", "--out", "--jobs"):  # replaced per run
        while flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    runs, procs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"run{i}.json" for i in range(len(pairs))]
        pending = list(zip(pairs, outs))
        while pending or procs:
            while pending and len(procs) < args.jobs:
                (d, t), o = pending.pop(0)
                procs.append(subprocess.Popen([sys.executable, __file__, *base, "--drafts", d,
                                               "--trees", t, "--out", str(o)]))
            procs[0].wait()
            if procs.pop(0).returncode:
                raise SystemExit("a parallel run failed (its output is above)")
        for o in outs:
            runs += json.loads(o.read_text())["runs"]
    return runs


if __name__ == "__main__":
    sys.exit(main())
