"""The shipped pair against transformers, on the CPU or a GPU, one run.

SmolLM2-135M-Instruct + the shipped EAGLE-3 draft (`drafts/smollm2-eagle-wide-eagle3`), the first N
development prompts (chat template), at most 128 new tokens, stop at EOS; float32 on the CPU,
bfloat16 on a GPU (--dtype). At each of --temperatures (0: greedy; > 0: top-p --top-p, no top-k,
prompt i seeded --seed + i), in the same process, interleaved prompt by prompt (so machine load
hits every configuration alike):
  - ours: the engine the demo builds (`spec-compile --draft ... --max-seq-len 1024`, default
    `--tree auto`, chosen on the benchmark's device), and its own non-speculative engine
    (`--tree chain-0`)
  - with --onnx, ours_onnx: the same engine (its tree, written to a JSON file) built with
    `--backend onnx` and run by ONNX Runtime
  - transformers eager `generate` (--hf-eager: at every temperature, the first only, or none)
  - transformers `generate` with its static cache + compile (`cache_implementation="static"`,
    Inductor, "reduce-overhead" (CUDA graphs) on a GPU; warmed up before timing), unless
    --no-hf-compile; sampled with the same
    temperature and top-p (top-k 0 passed explicitly: its default would be 50)
Times are wall clock per `generate` call, prefill included. Reports tokens/s (new tokens over
seconds, summed over prompts), tokens per verify call, each configuration's ratio to the fastest
transformers one at that temperature, greedy outputs that differ from ours, the device's
bandwidth (CPU: a 256 MB read; GPU: a device-to-device copy, bytes read + written) and the
weight bytes per step (the floor: one pass over the weights per verify call). Engines missing
under --engines are built first (minutes; one at a time). Writes JSON (--out) and prints a table last.

    python bench/bench_pair.py [--n 24] [--max-new-tokens 128] [--engines engines/]
                               [--device cpu|cuda] [--dtype float32|bfloat16]
                               [--temperatures 0,0.7,1.0] [--top-p 0.9] [--seed 0]
                               [--hf-eager all|first|none] [--no-hf-compile] [--onnx] [--out FILE.json]
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


def bandwidth(device: str) -> float:
    """GB/s: on the CPU, reading a 256 MB float32 tensor (median of 7 sums: the weights' read
    rate); on a GPU, a 1 GiB device-to-device copy counting bytes read + written (median of 7)."""
    if device == "cpu":
        x = torch.ones(64 * 2**20)
        ts = []
        for _ in range(8):
            t = time.perf_counter()
            x.sum()
            ts.append(time.perf_counter() - t)
        ts = sorted(ts[1:])
        return x.numel() * 4 / ts[len(ts) // 2] / 1e9
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ts = []
    for _ in range(8):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts = sorted(ts[1:])
    return 2 * x.numel() / ts[len(ts) // 2] / 1e6


def build_cmd(model: Path, draft: Path, out: Path, tree: str | None, device: str, dtype: str,
              backend: str = "inductor") -> list[str]:
    return [sys.executable, "-c", "import sys; from spec_compiler.cli import compile_main; "
            "sys.exit(compile_main(sys.argv[1:]))", str(model), "--draft", str(draft), "--out", str(out),
            "--max-seq-len", "1024", "--device", device, "--dtype", dtype, "--backend", backend] + (
            ["--tree", tree] if tree else [])


def build_all(cmds: dict[str, list[str]]) -> dict[str, float]:
    """Compile the engines one after another; seconds each. Not in parallel: `--tree auto`
    times candidate trees while it compiles, and a compile beside it skews that timing (it then
    picks a tree for a busy machine)."""
    out = {}
    for name, cmd in cmds.items():
        print("building:", " ".join(cmd[3:]), flush=True)
        t = time.time()
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"bench_pair: building {name} failed")
        out[name] = time.time() - t
    return out


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

    def __call__(self, ids: list[int], new: int, temperature: float, top_p: float, seed: int) -> dict:
        r = self.engine.generate(ids, max_new_tokens=new, temperature=temperature, top_p=top_p,
                                 seed=seed if temperature > 0 else None)
        return {"ids": r.output_ids, "seconds": r.seconds, "calls": r.verify_calls,
                "emitted": sum(r.accept_lengths)}


class HF:
    """transformers' generate: eager (its dynamic cache), or a static cache of the engine's
    capacity (one cache for every prompt, so the compiled decode step keeps one shape) with its
    forward compiled by Inductor (transformers compiles on CUDA only unless told), with CUDA
    graphs on a GPU as transformers' own compile config does."""

    def __init__(self, model_dir: Path, static: bool, device: str, dtype: torch.dtype, capacity: int = 1024):
        import transformers
        from transformers import GenerationConfig, LlamaForCausalLM
        from transformers.generation.configuration_utils import CompileConfig

        self.device = device
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        eos = self.model.generation_config.eos_token_id
        self.kw = dict(eos_token_id=eos, pad_token_id=0)
        self.cache, self.cache_kw = None, {}
        if static:
            from transformers import StaticCache

            # transformers' own default on a GPU ("reduce-overhead": CUDA graphs); on the CPU,
            # where there are none, Inductor's default mode
            cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
            cc._compile_all_devices = True
            self.kw.update(compile_config=cc)
            self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            self.cache_kw = {"cache" if (major, minor) >= (5, 20) else "past_key_values": self.cache}
        self.GenerationConfig = GenerationConfig

    def sync(self):
        if self.device != "cpu":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def __call__(self, ids: list[int], new: int, temperature: float, top_p: float, seed: int) -> dict:
        x = torch.tensor([ids], device=self.device)
        if self.cache is not None:
            self.cache.reset()
        samp = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
                else dict(do_sample=False))
        gc = self.GenerationConfig(max_new_tokens=new, **samp, **self.kw)
        torch.manual_seed(seed)
        self.sync()
        t = time.perf_counter()
        out = self.model.generate(x, generation_config=gc, attention_mask=torch.ones_like(x), **self.cache_kw)
        self.sync()
        s = time.perf_counter() - t
        return {"ids": out[0, len(ids):].tolist(), "seconds": s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models/SmolLM2-135M-Instruct")
    ap.add_argument("--draft", type=Path, default=REPO / "drafts/smollm2-eagle-wide-eagle3")
    ap.add_argument("--engines", type=Path, default=REPO / "engines",
                    help="where the engines are (built if missing): one named after --draft (the demo's, "
                         "--tree auto) and smollm2-chain0 (--tree chain-0); on a GPU with a "
                         "-DEVICE-DTYPE suffix")
    ap.add_argument("--prompts", type=Path, default=REPO / "spec_compiler/data/prompts_dev.jsonl")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--temperatures", default="0", help="comma-separated; 0 is greedy")
    ap.add_argument("--top-p", type=float, default=0.9, help="for temperatures > 0")
    ap.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i")
    ap.add_argument("--hf-eager", choices=("all", "first", "none"), default="all",
                    help="transformers eager at every temperature, the first one only, or not at all")
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--onnx", action="store_true",
                    help="also ours with --backend onnx (ONNX Runtime), on ours' tree")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/cpu.json on the CPU, bench/results/pair_cuda.json on a GPU")
    args = ap.parse_args(argv)
    dev = args.device
    dtype = args.dtype or ("float32" if dev == "cpu" else "bfloat16")
    temps = [float(t) for t in args.temperatures.split(",")]
    out_path = args.out or REPO / ("bench/results/cpu.json" if dev == "cpu" else f"bench/results/pair_{dev}.json")
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_pair: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 1

    res: dict = {"device": cpu_name() if dev == "cpu" else torch.cuda.get_device_name(),
                 "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "dtype": dtype,
                 "loadavg_start": os.getloadavg(), "n_prompts": args.n, "temperatures": temps,
                 "top_p": args.top_p, "seed": args.seed, "max_new_tokens": args.max_new_tokens}
    import transformers

    res["transformers"] = transformers.__version__
    suffix = "" if dev == "cpu" else f"-{dev}-{dtype}"
    engines = {"ours": (args.engines / f"{args.draft.name}{suffix}", None),
               "ours_chain0": (args.engines / f"smollm2-chain0{suffix}", "chain-0")}
    res["build_s"] = build_all({name: build_cmd(args.model, args.draft, d, tree, dev, dtype)
                                for name, (d, tree) in engines.items()
                                if not (d / "manifest.json").is_file()})
    runners = {name: Ours(d) for name, (d, _) in engines.items()}
    if args.onnx:  # ours' tree (chosen for Inductor's step times), built for ONNX Runtime
        d = args.engines / f"{args.draft.name}-onnx{suffix}"
        tree_file = args.engines / f"{args.draft.name}{suffix}.tree.json"
        tree_file.write_text(json.dumps(runners["ours"].engine.spec.manifest["tree"]["paths"]))
        if not (d / "manifest.json").is_file():
            res["build_s"]["ours_onnx"] = build_all(
                {"ours_onnx": build_cmd(args.model, args.draft, d, str(tree_file), dev, dtype, "onnx")})["ours_onnx"]
        runners["ours_onnx"] = Ours(d)
    res["tree"] = runners["ours"].tree
    res["tree_nodes"] = runners["ours"].nodes
    res["tree_choice"] = runners["ours"].choice
    tdtype = getattr(torch, dtype)
    if args.hf_eager != "none":
        runners["hf_eager"] = HF(args.model, static=False, device=dev, dtype=tdtype)
    if not args.no_hf_compile:
        runners["hf_static_compile"] = HF(args.model, static=True, device=dev, dtype=tdtype)
    tok = runners["ours"].engine
    prompts = [tok.encode_prompt(p) for p in load_prompts(args.prompts, args.n)]

    print("warm-up (transformers' compile included)", flush=True)
    for name, run in runners.items():
        t = time.time()
        for temp in {temps[0], temps[-1]}:
            for _ in range(2):
                run(prompts[0], 16, temp, args.top_p, 0)
        res.setdefault("warmup_s", {})[name] = time.time() - t
    res["bandwidth_GBps"] = bandwidth(dev)
    hf_model = next((r.model for k, r in runners.items() if k.startswith("hf_")), None)
    if hf_model is None:
        hf_model = HF(args.model, False, "cpu", tdtype).model
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in hf_model.parameters())  # tied once

    res["summary"], res["per_prompt"] = {}, {}
    for temp in temps:
        active = {k: r for k, r in runners.items()
                  if k != "hf_eager" or args.hf_eager == "all" or temp == temps[0]}
        per: dict[str, list[dict]] = {k: [] for k in active}
        mismatch: dict[str, int] = {k: 0 for k in active}
        for i, ids in enumerate(prompts):
            ref = None
            for name, run in active.items():
                r = run(ids, args.max_new_tokens, temp, args.top_p, args.seed + i)
                ref = r["ids"] if ref is None else ref
                mismatch[name] += r["ids"] != ref
                per[name].append({k: v for k, v in r.items() if k != "ids"} | {"tokens": len(r["ids"])})
            print(f"T={temp} prompt {i + 1}/{len(prompts)}: " + "  ".join(
                f"{k} {p[-1]['tokens'] / p[-1]['seconds']:.1f} tok/s" for k, p in per.items()), flush=True)
        summary = {}
        for name, rows in per.items():
            tokens, secs = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
            s = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
                 # sampled outputs differ by design (different random streams)
                 "outputs_differing_from_ours": mismatch[name] if temp == 0 else None}
            if "calls" in rows[0]:
                s["tokens_per_call"] = sum(r["emitted"] for r in rows) / sum(r["calls"] for r in rows)
                s["ms_per_call"] = 1000 * secs / sum(r["calls"] for r in rows)
            summary[name] = s
        hf = [k for k in summary if k.startswith("hf_")]
        if hf:
            best = max(hf, key=lambda k: summary[k]["tokens_per_s"])
            for s in summary.values():
                s["vs_fastest_transformers"] = s["tokens_per_s"] / summary[best]["tokens_per_s"]
        res["summary"][str(temp)] = summary
        res["per_prompt"][str(temp)] = per
    res["loadavg_end"] = os.getloadavg()
    res["floor_ms_per_step"] = res["weight_bytes"] / res["bandwidth_GBps"] / 1e6
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1).replace(str(REPO) + "/", ""))  # repo-relative paths

    print(f"\n{res['device']} ({res['cores']} CPU cores, {res['threads']} threads), bandwidth "
          f"{res['bandwidth_GBps']:.1f} GB/s, weights {res['weight_bytes'] / 1e6:.0f} MB "
          f"(floor {res['floor_ms_per_step']:.3f} ms per pass), load average "
          f"{res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}")
    print(f"{args.n} dev prompts, <= {args.max_new_tokens} new tokens, {dtype}; ours: tree "
          f"{res['tree']} ({res['tree_nodes']} nodes); sampled: top-p {args.top_p}, top-k 0")
    print("T | config | tokens/s | tokens/call | ms/call | vs fastest transformers | greedy outputs differing")
    for temp, summary in res["summary"].items():
        for name, s in summary.items():
            tpc = f"{s['tokens_per_call']:.2f}" if "tokens_per_call" in s else "-"
            mpc = f"{s['ms_per_call']:.2f}" if "ms_per_call" in s else "-"
            vs = f"{s['vs_fastest_transformers']:.2f}x" if "vs_fastest_transformers" in s else "-"
            diff = "-" if s["outputs_differing_from_ours"] is None else s["outputs_differing_from_ours"]
            print(f"{temp} | {name} | {s['tokens_per_s']:.1f} | {tpc} | {mpc} | {vs} | {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
