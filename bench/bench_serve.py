"""Serving benchmark: spec-serve against transformers' continuous batching, one request trace.

A request-rate sweep over the development prompts (spec_compiler/data/prompts_dev.jsonl, field
"prompt", chat template, cycled): at each rate, --n requests arrive as a Poisson process
(seeded; rate `inf`: all at once, saturation), each a streamed chat completion of at most
--max-new-tokens (greedy unless --temperature). Per request: time to first token (first
streamed text) and time per output token ((end - first token) / (tokens - 1)); per rate:
output tokens/s over the run (first arrival to last end) and p50 / p99 of both latencies.

    python bench/bench_serve.py --engine ENGINE_DIR --model MODEL_DIR
           [--rates 1,2,4,8,16,inf] [--n 64] [--max-new-tokens 128] [--device cuda]
           [--dtype bfloat16] [--peer auto|serve|cb|none] [--peer-compile] [--servers ours,peer]
           [--out FILE.json]
    python bench/bench_serve.py --merge A.json,B.json --out FILE.json   (one table of several runs)

ENGINE_DIR: ours, built with --max-batch N (the slots). The peer, in the same run, same trace:
  - serve: `transformers serve MODEL_DIR --continuous-batching` (an OpenAI server like ours,
    driven by the same client; needs `pip install transformers[serving]`), --peer-compile adds
    its --compile;
  - cb: transformers' continuous batching in this process (`init_continuous_batching`: the
    engine behind `generate_batch`), fed the same arrivals, tokens streamed back;
  - auto (default): serve where fastapi and uvicorn import, else cb.
Servers run one at a time (ours, then the peer), so each has the machine. Writes JSON (--out)
and prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "spec_compiler" / "data" / "prompts_dev.jsonl"


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def trace(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of n requests, Poisson at `rate`/s; inf: all at 0."""
    if rate == float("inf"):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def summarize(reqs: list[dict], wall: float) -> dict:
    ok = [r for r in reqs if r.get("error") is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"requests": len(reqs), "failed": len(reqs) - len(ok), "output_tokens": tokens,
            "seconds": wall, "tokens_per_second": tokens / wall if wall > 0 else None,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


# ---- an OpenAI server, driven over HTTP ----
class Server:
    def __init__(self, cmd: list[str], url: str | None, env: dict | None = None, timeout: float = 1800):
        """Start `cmd`; the URL is read from its stderr ("on http://...", spec-serve) or given,
        then /health is polled."""
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = url
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url is None:
                m = re.search(r"on (http://[\d.]+:\d+)", "".join(self.log))
                self.url = m and m.group(1)
            if self.url is not None and self._healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"bench_serve: {cmd[0:3]} did not start:\n{''.join(self.log)[-3000:]}")

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def model_id(self, default: str | None = None) -> str:
        """The first model /v1/models lists; `default` where that fails (transformers 5.17's
        `serve` answers 500 there on a machine without a Hugging Face cache, though it serves
        the model it was started with under its path)."""
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
                return json.loads(r.read())["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            if default is None:
                raise
            print(f"  {self.url}/v1/models: {e}; using the model id {default!r}", file=sys.stderr)
            return default

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _one(session, url, model, messages, max_new, temperature, seed, t_send) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_new, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if temperature > 0:
        body["seed"] = seed
    first, tokens, chunks = None, None, 0
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if d.get("usage"):
                    tokens = d["usage"]["completion_tokens"]
                for c in d.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        chunks += 1
                        first = first or time.perf_counter()
    except Exception as e:  # a failed request is counted, not fatal
        return {"error": repr(e)[:200]}
    end = time.perf_counter()
    tokens = chunks if tokens is None else tokens  # a server without usage: one token per chunk
    return {"ttft": None if first is None else first - t_send, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if first is not None and tokens > 1 else None,
            "start": t_send, "end": end}


async def drive_http(url: str, model: str, prompts: list[str], arrivals: list[float], max_new: int,
                     temperature: float, seed: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def at(i, t):
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
            msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
            return await _one(session, url, model, msgs, max_new, temperature, seed + i, time.perf_counter())

        reqs = await asyncio.gather(*(at(i, t) for i, t in enumerate(arrivals)))
    ends = [r["end"] for r in reqs if "end" in r]
    return summarize(reqs, (max(ends) - t0) if ends else 0.0) | {"per_request": reqs}


# ---- transformers' continuous batching in-process, fed the same arrivals ----
def drive_cb(model_dir: Path, device: str, dtype: str, prompts: list[str], sweeps: dict[float, list[float]],
             max_new: int, temperature: float, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=temperature > 0, eos_token_id=model.config.eos_token_id,
                          pad_token_id=tok.pad_token_id or 0, **({"temperature": temperature, "top_p": 1.0, "top_k": 0}
                                                               if temperature > 0 else {}))
    enc = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
    manager = model.init_continuous_batching(generation_config=gc)
    manager.start()
    out = {}
    try:
        for rate, arrivals in [("warm-up", [0.0, 0.0])] + list(sweeps.items()):  # warm-up: untimed
            reqs: dict[str, dict] = {}
            t0 = time.perf_counter()

            def feed():
                for i, t in enumerate(arrivals):
                    time.sleep(max(0.0, t0 + t - time.perf_counter()))
                    rid = f"r{rate}-{i}"
                    reqs[rid] = {"start": time.perf_counter(), "first": None, "tokens": 0}
                    manager.add_request(enc[i % len(enc)], request_id=rid, max_new_tokens=max_new, streaming=True)

            feeder = threading.Thread(target=feed)
            feeder.start()
            done = 0
            while done < len(arrivals):
                res = manager.get_result(timeout=1.0)
                if res is None:
                    if not feeder.is_alive() and manager._generation_thread is None:
                        raise SystemExit("bench_serve: transformers' continuous batching stopped")
                    continue
                r, now = reqs[res.request_id], time.perf_counter()
                if res.generated_tokens and r["first"] is None:
                    r["first"] = now
                r["tokens"] = len(res.generated_tokens)
                if res.is_finished():
                    r["end"], done = now, done + 1
                    r["error"] = res.error
            feeder.join()
            rows = [{"ttft": None if r["first"] is None else r["first"] - r["start"], "tokens": r["tokens"],
                     "tpot": (r["end"] - r["first"]) / (r["tokens"] - 1) if r["first"] and r["tokens"] > 1 else None,
                     "start": r["start"], "end": r["end"], "error": r.get("error")} for r in reqs.values()]
            out[rate] = summarize(rows, max(r["end"] for r in rows) - t0) | {"per_request": rows}
            print(f"  peer (cb) rate {rate}: {out[rate]['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
        del out["warm-up"]
    finally:
        manager.stop(block=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=Path, help="our engine (spec-compile --max-batch N)")
    ap.add_argument("--model", type=Path, help="the target's HF checkpoint, for the peer")
    ap.add_argument("--rates", default="1,2,4,8,16,inf", help="requests/s, comma-separated; inf = all at once")
    ap.add_argument("--n", type=int, default=64, help="requests per rate (default 64)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=Path, default=PROMPTS)
    ap.add_argument("--device", default="cuda", help="the peer's device (ours is the engine's)")
    ap.add_argument("--dtype", default="bfloat16", help="the peer's dtype")
    ap.add_argument("--peer", choices=("auto", "serve", "cb", "none"), default="auto")
    ap.add_argument("--peer-compile", action="store_true", help="transformers serve --compile")
    ap.add_argument("--servers", default="ours,peer",
                    help="which to run: ours, peer or both (two runs pinned to different GPUs can share "
                    "a machine; --merge joins their JSON)")
    ap.add_argument("--merge", default="", metavar="A.json,B.json", help="run nothing: one table of earlier runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        meta = {**runs[0]["meta"], "merged_from": args.merge.split(","),
                "peer": next((r["meta"]["peer"] for r in runs if r["meta"].get("peer") not in (None, "none")), "none")}
        results = {k: v for r in runs for k, v in r["results"].items()}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print_table(results, args.out)
        return 0
    servers = set(args.servers.split(","))
    if not servers <= {"ours", "peer"} or not servers:
        ap.error("--servers: ours, peer or ours,peer")
    if "ours" in servers and args.engine is None:
        ap.error("--engine ENGINE_DIR is needed for ours (or --servers peer, or --merge)")
    if "peer" not in servers:
        args.peer = "none"
    if args.peer != "none" and args.model is None:
        ap.error("--model MODEL_DIR is needed for the peer (or --peer none)")
    rates = [float(r) for r in args.rates.split(",")]
    prompts = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines() if line.strip()]
    sweeps = {r: trace(args.n, r, args.seed + k) for k, r in enumerate(rates)}
    results: dict[str, dict] = {}

    def sweep_http(name: str, server: Server, model: str | None = None):
        model = server.model_id(model)
        asyncio.run(drive_http(server.url, model, prompts, [0.0] * 2, 8, args.temperature, args.seed))  # warm-up
        results[name] = {}
        for r, arrivals in sweeps.items():
            results[name][r] = asyncio.run(drive_http(server.url, model, prompts, arrivals, args.max_new_tokens,
                                                      args.temperature, args.seed))
            print(f"  {name} rate {r}: {results[name][r]['tokens_per_second']:.1f} tokens/s", file=sys.stderr)

    peer = args.peer
    if peer == "auto":
        peer = "serve" if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")) else "cb"
    meta = {"engine": str(args.engine), "model": str(args.model), "n": args.n, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "rates": args.rates, "peer": peer}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after each server: what is measured survives a run stopped later
        args.out.write_text(json.dumps({"meta": meta, "results": {k: {str(r): v for r, v in d.items()}
                                                                  for k, d in results.items()}}, indent=1))

    if "ours" in servers:
        ours = Server([sys.executable, "-m", "spec_compiler.serve", str(args.engine), "--port", "0"], None)
        try:
            sweep_http("spec-serve", ours)
        finally:
            ours.stop()
        write()
    if peer == "serve":
        port = 8000 + random.Random().randrange(1000)
        cmd = ["transformers", "serve", str(args.model), "--continuous-batching", "--host", "127.0.0.1",
               "--port", str(port), "--device", args.device, "--dtype", args.dtype]
        srv = Server(cmd + (["--compile"] if args.peer_compile else []), f"http://127.0.0.1:{port}")
        try:
            sweep_http("transformers serve" + (" --compile" if args.peer_compile else ""), srv, str(args.model))
        except BaseException:
            print("".join(srv.log)[-3000:], file=sys.stderr)  # the peer's own account of a failure
            raise
        finally:
            srv.stop()
    elif peer == "cb":
        results["transformers cb"] = drive_cb(args.model, args.device, args.dtype, prompts, sweeps,
                                              args.max_new_tokens, args.temperature, args.seed)
    write()
    print_table({k: {str(r): v for r, v in d.items()} for k, d in results.items()}, args.out)
    return 0


def print_table(results: dict, out: Path) -> None:
    def f(x, scale=1.0, spec="{:.1f}"):
        return "-" if x is None else spec.format(x * scale)

    print(f"\nwrote {out}")
    print(f"{'server':20} {'rate':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9} {'failed':>6}   (ms)")
    for name, d in results.items():
        for r, s in d.items():
            print(f"{name:20} {float(r):>5g} {f(s['tokens_per_second']):>8} {f(s['ttft_p50'], 1e3):>9} "
                  f"{f(s['ttft_p99'], 1e3):>9} {f(s['tpot_p50'], 1e3, '{:.2f}'):>9} "
                  f"{f(s['tpot_p99'], 1e3, '{:.2f}'):>9} {s['failed']:>6}")


if __name__ == "__main__":
    sys.exit(main())
