"""CPU decode benchmark of the shipped pair: this project's engines vs transformers, one run.

SmolLM2-135M-Instruct + the shipped 1-layer EAGLE draft (`drafts/smollm2-eagle`), float32 on both
sides, greedy, the first N development prompts (chat template), at most 128 new tokens (stop at
EOS: greedy outputs are identical, so every configuration emits the same tokens). In the same
process, interleaved prompt by prompt (so machine load hits every configuration alike):
  - ours: the engine the demo builds (`spec-compile --draft ... --max-seq-len 1024`, default
    `--tree auto`), and its own non-speculative engine (`--tree chain-0`)
  - transformers eager `generate`
  - transformers `generate` with its static cache + compile (`cache_implementation="static"`,
    Inductor on the CPU; warmed up before timing), unless --no-hf-compile
Times are wall clock per `generate` call, prefill included. Reports tokens/s (new tokens over
seconds, summed over prompts), tokens per verify call, each configuration's ratio to the fastest
transformers one, the machine's read bandwidth and the float32 weight bytes per step (the
floor: one pass over the weights per verify call). Engines missing under --engines are built
first (minutes). Writes JSON (--out) and prints a table last.

    python bench/bench_cpu.py [--n 24] [--max-new-tokens 128] [--engines engines/]
                              [--no-hf-compile] [--out bench/results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def read_bandwidth() -> float:
    """GB/s reading a 256 MB float32 tensor (median of 7 sums): the weights' read rate."""
    x = torch.ones(64 * 2**20)
    ts = []
    for _ in range(8):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    ts = sorted(ts[1:])
    return x.numel() * 4 / ts[len(ts) // 2] / 1e9


def build(model: Path, draft: Path, out: Path, tree: str | None) -> float:
    t = time.time()
    cmd = [sys.executable, "-c", "import sys; from spec_compiler.cli import compile_main; "
           "sys.exit(compile_main(sys.argv[1:]))", str(model), "--draft", str(draft), "--out", str(out),
           "--max-seq-len", "1024"] + (["--tree", tree] if tree else [])
    print("building:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - t


def load_prompts(path: Path, n: int) -> list[str]:
    return [json.loads(x)["prompt"] for x in path.read_text().splitlines()[:n]]


class Ours:
    def __init__(self, engine_dir: Path):
        from spec_compiler.runtime import Engine

        self.engine = Engine.load(engine_dir)
        m = self.engine.spec.manifest
        self.tree = m["tree"]["name"]
        self.nodes = self.engine.dims.tree_nodes
        self.choice = m.get("tree_choice")

    def __call__(self, ids: list[int], new: int) -> dict:
        r = self.engine.generate(ids, max_new_tokens=new)
        return {"ids": r.output_ids, "seconds": r.seconds, "calls": r.verify_calls,
                "emitted": sum(r.accept_lengths)}


class HF:
    """transformers' greedy generate: eager (its dynamic cache), or a static cache of the
    engine's capacity (one cache for every prompt, so the compiled decode step keeps one shape)
    with its forward compiled by Inductor (transformers compiles on CUDA only unless told)."""

    def __init__(self, model_dir: Path, static: bool, capacity: int = 1024):
        import transformers
        from transformers import GenerationConfig, LlamaForCausalLM
        from transformers.generation.configuration_utils import CompileConfig

        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        kw = dict(do_sample=False, eos_token_id=eos, pad_token_id=0)
        self.cache, self.cache_kw = None, {}
        if static:
            from transformers import StaticCache

            cc = CompileConfig(fullgraph=True, mode="default")
            cc._compile_all_devices = True
            kw.update(compile_config=cc)
            self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            self.cache_kw = {"cache" if (major, minor) >= (5, 20) else "past_key_values": self.cache}
        self.gc = GenerationConfig(**kw)

    @torch.inference_mode()
    def __call__(self, ids: list[int], new: int) -> dict:
        x = torch.tensor([ids])
        if self.cache is not None:
            self.cache.reset()
        self.gc.max_new_tokens = new
        t = time.perf_counter()
        out = self.model.generate(x, generation_config=self.gc, attention_mask=torch.ones_like(x),
                                  **self.cache_kw)
        s = time.perf_counter() - t
        return {"ids": out[0, len(ids):].tolist(), "seconds": s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models/SmolLM2-135M-Instruct")
    ap.add_argument("--draft", type=Path, default=REPO / "drafts/smollm2-eagle")
    ap.add_argument("--engines", type=Path, default=REPO / "engines",
                    help="where the engines are (built if missing): smollm2-eagle (the demo's, "
                         "--tree auto) and smollm2-chain0 (--tree chain-0)")
    ap.add_argument("--prompts", type=Path, default=REPO / "spec_compiler/data/prompts_dev.jsonl")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/cpu.json")
    args = ap.parse_args(argv)

    res: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "loadavg_start": os.getloadavg(), "n_prompts": args.n,
                 "max_new_tokens": args.max_new_tokens, "build_s": {}}
    import transformers

    res["transformers"] = transformers.__version__
    engines = {"ours": (args.engines / "smollm2-eagle", None),
               "ours_chain0": (args.engines / "smollm2-chain0", "chain-0")}
    for name, (d, tree) in engines.items():
        if not (d / "manifest.json").is_file():
            res["build_s"][name] = build(args.model, args.draft, d, tree)
    runners = {name: Ours(d) for name, (d, _) in engines.items()}
    res["tree"] = runners["ours"].tree
    res["tree_nodes"] = runners["ours"].nodes
    res["tree_choice"] = runners["ours"].choice
    runners["hf_eager"] = HF(args.model, static=False)
    if not args.no_hf_compile:
        runners["hf_static_compile"] = HF(args.model, static=True)
    tok = runners["ours"].engine
    prompts = [tok.encode_prompt(p) for p in load_prompts(args.prompts, args.n)]

    print("warm-up (transformers' compile included)", flush=True)
    for name, run in runners.items():
        t = time.time()
        for _ in range(2):
            run(prompts[0], 16)
        res.setdefault("warmup_s", {})[name] = time.time() - t
    res["read_bandwidth_GBps"] = read_bandwidth()
    w = runners["hf_eager"].model
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in w.parameters())  # tied once

    per: dict[str, list[dict]] = {k: [] for k in runners}
    mismatch: dict[str, int] = {k: 0 for k in runners}
    for i, ids in enumerate(prompts):
        ref = None
        for name, run in runners.items():
            r = run(ids, args.max_new_tokens)
            ref = r["ids"] if ref is None else ref
            mismatch[name] += r["ids"] != ref
            per[name].append({k: v for k, v in r.items() if k != "ids"} | {"tokens": len(r["ids"])})
        print(f"prompt {i + 1}/{len(prompts)}: " + "  ".join(
            f"{k} {p[-1]['tokens'] / p[-1]['seconds']:.1f} tok/s" for k, p in per.items()), flush=True)
    res["loadavg_end"] = os.getloadavg()
    summary = {}
    for name, rows in per.items():
        tokens, secs = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
        s = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
             "outputs_differing_from_ours": mismatch[name]}
        if "calls" in rows[0]:
            s["tokens_per_call"] = sum(r["emitted"] for r in rows) / sum(r["calls"] for r in rows)
            s["ms_per_call"] = 1000 * secs / sum(r["calls"] for r in rows)
        summary[name] = s
    hf = [k for k in summary if k.startswith("hf_")]
    best = max(hf, key=lambda k: summary[k]["tokens_per_s"])
    for s in summary.values():
        s["vs_fastest_transformers"] = s["tokens_per_s"] / summary[best]["tokens_per_s"]
    res["fastest_transformers"] = best
    res["summary"] = summary
    res["per_prompt"] = per
    res["floor_ms_per_step"] = res["weight_bytes"] / res["read_bandwidth_GBps"] / 1e6
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1).replace(str(REPO) + "/", ""))  # repo-relative paths

    print(f"\n{res['cpu']}, {res['cores']} cores, {res['threads']} threads, read bandwidth "
          f"{res['read_bandwidth_GBps']:.1f} GB/s, weights {res['weight_bytes'] / 1e6:.0f} MB "
          f"(floor {res['floor_ms_per_step']:.1f} ms per pass), load average "
          f"{res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}")
    print(f"{args.n} dev prompts, greedy, <= {args.max_new_tokens} new tokens, float32; "
          f"ours: tree {res['tree']} ({res['tree_nodes']} nodes)")
    print("config | tokens/s | tokens/call | ms/call | vs fastest transformers | outputs differing")
    for name, s in summary.items():
        tpc = f"{s['tokens_per_call']:.2f}" if "tokens_per_call" in s else "-"
        mpc = f"{s['ms_per_call']:.1f}" if "ms_per_call" in s else "-"
        print(f"{name} | {s['tokens_per_s']:.1f} | {tpc} | {mpc} | {s['vs_fastest_transformers']:.2f}x | "
              f"{s['outputs_differing_from_ours']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
