"""Batched decoding throughput: tokens/s against batch size, the tree dispatcher vs plain decoding
vs speculation at every bucket vs transformers' own batched generation.

Curves, for batch sizes 1, 2, 4, ... 64 (--batches):
  ours_dispatch  --tree auto: a tree per bucket, chosen on this device (chain-0 where
                 speculation does not pay: measured dispatch, the compiled steps timed), the
                 engine's `tree_choice` record kept in the JSON
  ours_plain     --tree chain-0 with the same buckets (non-speculative)
  ours_forced    the dispatcher's batch-1 tree at every bucket (speculation forced on); for the
                 random-weight shapes with --forced-from-dispatch, the speculative steps that the
                 dispatcher engine's measured dispatch timed at each bucket (that bucket's tree)
  hf             transformers: batched generate with its static cache (the prompts left-padded),
                 and its continuous-batching generate_batch where it has one; the faster of the two
Models (--shapes):
  pair           the real SmolLM2 pair (--model, --draft) on the dev prompts, greedy, wall tokens/s
                 (tokens per verify call recorded), by --schedule: waves (generate_batch at batch
                 b over the same max(b, 16) prompts, in waves of b decoded together: a wave lasts
                 its slowest sequence) and continuous (one generate_batch over max(16, 4b)
                 prompts with at most b live at once, max_live=b: a queued prompt admitted as one
                 ends, as a server does; the shape "pair-continuous" in the results)
  llama8b, smollm2, tiny   random weights (bench_decode's shapes; tiny: a CPU smoke test):
                 timed steps from a random CTX-token context (Engine.start_synthetic) at each
                 batch; tokens/s = b x the bucket tree's expected tokens per call (the draft's
                 acceptance table, --accept; random weights accept nothing) / step time; the
                 draft's lm_head over --draft-vocab hot tokens (bench_decode's default: 32k for
                 llama8b)
Writes JSON (--out), prints a table, and draws a PNG next to it (skipped without matplotlib). The
JSON also holds each engine's state size (`state_mib`: every slot's caches, allocated at load for
the largest bucket) and, for the pair, how far each batch size's outputs agree with the first
batch size's (`same_as_first_batch`, `prefix_as_first_batch`: bf16 buckets round differently).

    python bench/bench_batch.py [--device cuda] [--shapes pair,llama8b] [--batches 1,2,4,8,16,32,64]
                                [--engines DIR [--build-only [--only NAMES]]] [--curves NAMES]
                                [--schedule waves,continuous] [--draft-vocab N] [--forced-from-dispatch]
                                [--out bench/results/batch_DEVICE.json]
    python bench/bench_batch.py --merge A.json,B.json --out FILE.json   (one table and plot of several runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPES, hot_draft, parse_draft_vocab, random_modules  # noqa: E402

from spec_compiler.config import CompileConfig, ModelConfig  # noqa: E402
from spec_compiler.pipeline import compile_modules, measured_trees, step_ms, with_bucket_trees  # noqa: E402
from spec_compiler.tree_choice import AcceptTable, AutoTree  # noqa: E402
from spec_compiler.trees import TreeSpec, chain  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES = {**SHAPES, "tiny": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, n_layers=2,
                                        n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=1e4,
                                        tie_word_embeddings=True, eos_token_ids=(2,))}
CTX, NEW, STEPS = 128, 128, 20
MIN_PROMPTS = 16  # the pair: every batch size decodes at least this many prompts (in waves of b)
CONTINUOUS_PER_SLOT = 4  # the pair's continuous schedule at batch b: max(16, 4b) prompts, b live at once


def waves(items: list, b: int) -> list[list]:
    """The pair's workload at batch b: the first max(b, MIN_PROMPTS) prompts (cycled), in waves
    of b decoded together, so a small batch is not timed on one or two prompts' acceptance and
    every batch size sees the same prompts."""
    seq = [items[i % len(items)] for i in range(max(b, MIN_PROMPTS))]
    return [seq[i:i + b] for i in range(0, len(seq), b)]


CURVES = ("ours_dispatch", "ours_plain", "ours_forced", "hf")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_engines(shape: str, batches: list[int], table: AcceptTable, root: Path, device: str,
                   only: tuple[str, ...] = (), draft_vocab: int = 0) -> dict:
    """Build (or reuse) the three engines of a random-weight shape; returns name -> dir, and
    name -> {"seconds", "graphs_from_cache"} of its compile (None if reused from an earlier run
    that did not record it). The dispatcher's is a whole engine (its compile time is the one
    reported; graphs taken from the lowered-graph cache make it a resumed one); the other two have
    the step's graphs only (timed steps start from a synthetic context: no prefill). `only`:
    build just these (two processes can share the work); the dispatcher's trees are chosen once
    and kept in a file beside the engines, so every process builds from the same choice."""
    names = ("ours_dispatch", "ours_plain", "ours_forced")
    # engines with a draft are named by its vocabulary (`draft_vocab` hot tokens, 0: the full one)
    tag = {n: f"{shape}-v{draft_vocab}" if draft_vocab and n != "ours_plain" else shape for n in names}
    dirs = {name: root / f"{tag[name]}-{name}-{device}" for name in names}
    seconds = {name: root / f"{tag[name]}-{name}-{device}.compile_s" for name in names}

    def recorded() -> dict:  # name -> {"seconds", "graphs_from_cache"} (a float: an older record)
        out = {}
        for n, f in seconds.items():
            rec = json.loads(f.read_text()) if f.is_file() else None
            out[n] = {"seconds": rec, "graphs_from_cache": None} if isinstance(rec, (int, float)) else rec
        return out

    todo = [n for n in names if not (dirs[n] / "manifest.json").is_file() and (not only or n in only)]
    if not todo:
        return dirs, recorded()
    m = SHAPES[shape]
    target, draft, dcfg = random_modules(m, device=device)
    if draft_vocab:  # the draft's lm_head over `draft_vocab` hot tokens (EAGLE-3's and the paper's 32k)
        draft, dcfg = hot_draft(target, draft, dcfg, draft_vocab)
    dtype = "bfloat16" if device == "cuda" else "float32"
    if device != "cuda":
        target, draft = target.float(), draft.float()
    backend = "inductor" if device == "cuda" else "eager"
    base = CompileConfig(model=m, draft=dcfg, tree=chain(1), max_seq_len=1024, dtype=dtype, device=device,
                         prefill_chunk=64, backend=backend, batch_size=max(batches), sampling=False)
    from spec_compiler import engine_format as fmt

    cfgs = {"ours_plain": dataclasses.replace(base, tree=chain(0), draft=None)}
    choice = None
    if any(n != "ours_plain" for n in todo):  # the plain engine alone needs no tree choice
        chosen = root / f"{tag['ours_dispatch']}-{device}.trees.json"
        if chosen.is_file():
            kept = json.loads(chosen.read_text())
            trees, choice = tuple(TreeSpec.from_json(t) for t in kept["trees"]), kept["choice"]
        else:
            t = time.time()
            trees, choice = AutoTree(table).choose_buckets(
                target, draft, base.max_seq_len, lambda d: fmt.min_capacity(base.prefill_chunk, d),
                fmt.buckets(base.batch_size), lambda s: print("  " + s, flush=True))
            print(f"  dispatcher's trees chosen in {time.time() - t:.0f} s", flush=True)
            chosen.write_text(json.dumps({"trees": [t.to_json() for t in trees], "choice": choice}))
        forced = trees[0] if trees[0].n_nodes > 1 else table.fitted(4)
        dispatch = with_bucket_trees(base, measured_trees(trees, choice))  # as spec-compile --tree auto does
        cfgs["ours_dispatch"] = dataclasses.replace(dispatch, plain_alternates=dispatch.draft is not None)
        cfgs["ours_forced"] = dataclasses.replace(base, tree=forced)
    for name in todo:
        cfg, d = cfgs[name], dirs[name]
        t, hits = time.time(), []

        def progress(s: str) -> None:
            hits.extend(["hit"] if "taken from the graph cache" in s else [])
            print("  " + s, flush=True)

        compile_modules(cfg, target, draft if cfg.draft is not None else None, d, progress=progress,
                        tree_choice=choice if name == "ours_dispatch" else None,
                        graphs=None if name == "ours_dispatch" else  # whole: its compile time is reported
                        ["verify", "draft"] if cfg.draft is not None else ["verify"])
        seconds[name].write_text(json.dumps({"seconds": round(time.time() - t, 1), "graphs_from_cache": len(hits)}))
        print(f"  built {d.name} in {time.time() - t:.0f} s ({len(hits)} graphs from the graph cache)", flush=True)
    del target, draft
    return dirs, recorded()


def bench_random(shape: str, batches: list[int], table: AcceptTable, root: Path, device: str,
                 build_only: bool = False, only: tuple[str, ...] = (), save=lambda res: None,
                 curves: tuple[str, ...] = CURVES, forced_from_dispatch: bool = False,
                 draft_vocab: int = 0) -> dict:
    """`save(res)` after each curve: what is measured survives a run stopped later. `curves`:
    the ones to measure (the peer alone builds nothing; a timed run builds only its curves'
    engines). `forced_from_dispatch`: the forced curve is not an engine of its own but the
    speculative steps that the dispatcher engine's measured dispatch timed at every bucket
    (each bucket's own tree, kept or not), so one build gives it."""
    from spec_compiler.runtime import Engine

    res = {c: {} for c in curves}
    res["draft_vocab"] = draft_vocab or SHAPES[shape].vocab_size
    ours = tuple(c for c in curves if c != "hf" and not (forced_from_dispatch and c == "ours_forced"))
    if build_only or ours:
        engines, res["compile_s"] = random_engines(shape, batches, table, root, device,
                                                   only if build_only else ours, draft_vocab)
    if build_only:
        return res
    if forced_from_dispatch and "ours_forced" in curves:
        res["ours_forced"] = forced_from_measured(engines["ours_dispatch"], batches)
    for name, d in engines.items() if ours else ():
        if name not in ours:
            continue
        eng = Engine.load(d)
        res.setdefault("state_mib", {})[name] = round(eng.state_bytes / 2**20, 1)  # caches + slot state
        for b in batches:
            bucket = next(x for x in eng.buckets if x >= b)
            tree = eng.spec.bucket_trees[bucket]
            tpc = table.expected_tpc(tree)
            ms = step_ms(eng, b, STEPS)  # what measured dispatch times, too
            res[name][b] = {"tokens_per_s": b * tpc * 1000 / ms, "step_ms": ms, "tree": tree.name,
                            "expected_tokens_per_call": tpc}
        del eng
        save(res)
    if "hf" in curves:
        res["hf"] = hf_random(SHAPES[shape], batches, device, lambda hf: save({**res, "hf": hf}))
    return res


def forced_from_measured(engine_dir: Path, batches: list[int]) -> dict:
    """Batch -> the forced curve's point read from a measured-dispatch engine's manifest: b x the
    bucket tree's expected tokens per call / its timed speculative step (`measure_dispatch` times
    it with `step_ms` at the bucket, as the curves are timed). Batches whose bucket was not timed
    speculatively (an engine built before `measured_trees`, where the cost model's chain-0 choice
    was kept untimed) are left out."""
    buckets = json.loads((engine_dir / "manifest.json").read_text())["tree_choice"].get("buckets", {})
    out = {}
    for b in batches:
        bucket = min((int(k) for k in buckets if int(k) >= b), default=None)
        m = buckets.get(str(bucket), {}).get("measured") if bucket is not None else None
        if m:
            out[b] = {"tokens_per_s": b * m["expected_tokens_per_call"] * 1000 / m["speculative_step_ms"],
                      "step_ms": m["speculative_step_ms"], "tree": m["tree"],
                      "expected_tokens_per_call": m["expected_tokens_per_call"],
                      "source": "the dispatcher engine's measured dispatch"}
    return out


def hf_random(m: ModelConfig, batches: list[int], device: str, save=lambda out: None) -> dict:
    """transformers' static-cache batched generate on random weights: b x NEW tokens per call
    (`save(out)` after each batch)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                       num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
                       tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        hf = LlamaForCausalLM(hcfg).to(dtype).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                          cache_implementation="static")
    out = {}
    for b in batches:
        prompt = torch.randint(3, m.vocab_size, (b, CTX), device=device)
        hf.generate(prompt, generation_config=gc)  # warm-up (and compile) at this shape
        sync(device)
        t = time.perf_counter()
        hf.generate(prompt, generation_config=gc)
        sync(device)
        out[b] = {"tokens_per_s": b * NEW / (time.perf_counter() - t), "method": "static generate"}
        save(out)
    del hf
    return out


def bench_pair(args, batches: list[int], save=lambda res: None) -> dict:
    """The real SmolLM2 pair: wall tokens/s of b prompts decoded together (`save(res)` after
    each curve)."""
    from spec_compiler.cli import compile_main
    from spec_compiler.runtime import Engine

    dev, dtype = args.device, "bfloat16" if args.device == "cuda" else "float32"
    prompts_text = [json.loads(x)["prompt"] for x in args.prompts.read_text().splitlines()]
    flags = ["--max-seq-len", "1024", "--device", dev, "--dtype", dtype, "--max-batch", str(max(batches)),
             "--no-sampling", "--draft", str(args.draft)]
    dirs = {"ours_dispatch": [], "ours_plain": ["--tree", "chain-0"]}
    curves = args.curves.split(",")
    # the engines built here: --only's, else those of the curves asked for (another process may
    # build the rest)
    only = [x for x in args.only.split(",") if x] or [c for c in curves if c != "hf"]
    res = {c: {} for c in curves}
    for name, extra in dirs.items():
        d = args.engines / f"pair-{name}-{dev}"
        if not (d / "manifest.json").is_file() and name in only:
            t = time.time()
            assert compile_main([str(args.model), "--out", str(d), *flags, *extra]) == 0
            print(f"  built {d.name} in {time.time() - t:.0f} s", flush=True)
    first_manifest = args.engines / f"pair-ours_dispatch-{dev}" / "manifest.json"
    if "ours_forced" in only and not (args.engines / f"pair-ours_forced-{dev}" / "manifest.json").is_file():
        build_forced(args, first_manifest, flags)
    if args.build_only:
        return res
    if first_manifest.is_file():
        res["tree_choice"] = json.loads(first_manifest.read_text())["tree_choice"]
    schedules = args.schedule.split(",")
    if "continuous" in schedules:
        res["continuous"] = {c: {} for c in curves if c != "hf"}
    for name in [c for c in ("ours_dispatch", "ours_plain", "ours_forced") if c in curves]:
        eng = Engine.load(args.engines / f"pair-{name}-{dev}")
        res.setdefault("state_mib", {})[name] = round(eng.state_bytes / 2**20, 1)  # caches + slot state
        ids = [eng.encode_prompt(p) for p in prompts_text]
        ref: dict[int, list[int]] = {}  # prompt -> its output at the first batch size (bf16 agreement)
        for b in batches:
            work = waves(ids, b)
            eng.generate_batch(work[0], max_new_tokens=8)  # warm-up (this bucket's CUDA graph capture)
            if "waves" in schedules:
                sync(dev)
                t, n, calls, steps, outs = time.perf_counter(), 0, 0, 0, []
                for wave in work:
                    out = eng.generate_batch(wave, max_new_tokens=args.max_new_tokens)
                    n += sum(len(r.output_ids) for r in out)
                    calls += sum(r.verify_calls for r in out)
                    steps += max(r.verify_calls for r in out)  # a wave lasts its slowest sequence
                    outs += [r.output_ids for r in out]
                sync(dev)
                s = time.perf_counter() - t
                res[name][b] = {"tokens_per_s": n / s, "tokens": n, "prompts": sum(map(len, work)),
                                "tokens_per_call": n / max(calls, 1), "wave_steps": steps,
                                "ms_per_wave_step": 1000 * s / max(steps, 1), **agreement(ref, outs)}
            if "continuous" in schedules:
                queue = [ids[i % len(ids)] for i in range(max(MIN_PROMPTS, CONTINUOUS_PER_SLOT * b))]
                sync(dev)
                t = time.perf_counter()
                out = eng.generate_batch(queue, max_new_tokens=args.max_new_tokens, max_live=b)
                n, calls = sum(len(r.output_ids) for r in out), sum(r.verify_calls for r in out)
                sync(dev)
                res["continuous"][name][b] = {"tokens_per_s": n / (time.perf_counter() - t), "tokens": n,
                                              "prompts": len(queue), "tokens_per_call": n / max(calls, 1),
                                              **agreement(ref, [r.output_ids for r in out])}
        del eng
        save(res)
    if "hf" in curves:
        res["hf"] = hf_pair(args, batches, prompts_text, lambda hf: save({**res, "hf": hf}))
    return res


def agreement(ref: dict[int, list[int]], outs: list[list[int]]) -> dict:
    """How far outputs at one batch size agree with the same engine's at the first (`ref`, filled
    by the first call: prompt position -> output), over the prompts both decoded: the share of
    identical outputs and the mean share of each reference output's leading tokens matched. In
    float32 every bucket is token-identical (tested); in bf16 different buckets run different
    matmul shapes, which round differently, and a near-tie can then go the other way."""
    if not ref:
        ref.update(enumerate(outs))
    both = [i for i in range(len(outs)) if i in ref]

    def prefix(a, b):
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return {"same_as_first_batch": sum(outs[i] == ref[i] for i in both) / len(both),
            "prefix_as_first_batch": sum(prefix(outs[i], ref[i]) / max(1, len(ref[i])) for i in both) / len(both)}


def build_forced(args, first_manifest: Path, flags: list[str]) -> None:
    """The pair's engine with speculation forced on at every bucket: the dispatcher's batch-1
    tree (--forced-tree N: fitted-N of the draft's own acceptance table, else read from the
    dispatcher engine, waited for under --build-only), chain-3 where that tree does not speculate."""
    from spec_compiler.cli import compile_main

    if args.forced_tree:
        paths = [list(p) for p in AcceptTable.read(args.draft / "accept.json").fitted(args.forced_tree).paths]
    else:
        while args.build_only and not first_manifest.is_file():  # another process builds it
            time.sleep(5)
        paths = json.loads(first_manifest.read_text())["bucket_trees"]["1"]["paths"]
    paths = paths or [[0] * (i + 1) for i in range(3)]
    tree_file = args.engines / f"pair-forced-tree-{args.device}.json"
    tree_file.write_text(json.dumps(paths))
    d = args.engines / f"pair-ours_forced-{args.device}"
    t = time.time()
    assert compile_main([str(args.model), "--out", str(d), *flags, "--tree", str(tree_file)]) == 0
    print(f"  built {d.name} in {time.time() - t:.0f} s", flush=True)


def hf_pair(args, batches: list[int], prompts_text: list[str], save=lambda out: None) -> dict:
    """transformers on the real model: left-padded static-cache generate, and generate_batch
    (continuous batching) where this transformers has it; the faster per batch (`save(out)`
    after each batch)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    dev = args.device
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token is None:  # a tokenizer without one (the GGUF conversion): pad with EOS, masked anyway
        tok.pad_token = tok.eos_token
    hf = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    hf = hf.to(dev).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts_text]
    gc = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id or 0,
                          eos_token_id=hf.generation_config.eos_token_id, cache_implementation="static")
    out = {}
    # every wave left-padded to the longest prompt: the static cache has one shape throughout, so
    # transformers compiles its decode step once, not once per prompt length
    longest = max(len(tok(t)["input_ids"]) for t in texts)

    def run(method: str, wave: list[str], max_new: int) -> int:
        """One wave decoded together; returns the tokens generated."""
        enc = tok(wave, return_tensors="pt", padding="max_length", max_length=longest).to(dev)
        if method == "static generate":
            o = hf.generate(**enc, generation_config=gc, max_new_tokens=max_new)
            return int((o[:, enc["input_ids"].shape[1]:] != gc.pad_token_id).sum())
        ids = [x[m.bool()].tolist() for x, m in zip(enc["input_ids"], enc["attention_mask"])]
        r = hf.generate_batch(ids, generation_config=GenerationConfig(do_sample=False, max_new_tokens=max_new))
        return sum(len(v.generated_tokens) for v in r.values())

    # every batch with the static cache first, then continuous batching: the peer's whole curve
    # exists early (its generate_batch is far slower to run here) and each batch keeps the faster
    for method in [m for m in ("static generate", "generate_batch") if m.split()[0] in args.hf_methods.split(",")]:
        for b in batches:
            work = waves(texts, b)
            try:
                # warm-up at the timed length: the static cache's shape is prompt + max_new_tokens,
                # so a shorter warm-up left a compile of the timed shape inside the timing
                run(method, work[0], args.max_new_tokens)
                sync(dev)
                t = time.perf_counter()
                n = sum(run(method, wave, args.max_new_tokens) for wave in work)
                sync(dev)
                s = time.perf_counter() - t
            except Exception as e:  # an older transformers, or one without continuous batching here
                print(f"  hf {method} at batch {b}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            print(f"  hf {method} at batch {b}: {n / s:.1f} tokens/s", flush=True)
            if out.get(b) is None or n / s > out[b]["tokens_per_s"]:
                out[b] = {"tokens_per_s": n / s, "tokens": n, "method": method}
            save(out)
    return out


def table_and_plot(results: dict, batches: list[int], png: Path) -> None:
    for shape, res in results.items():
        print(f"\n{shape}: tokens/s by batch")
        print("batch  " + "  ".join(f"{c:>14}" for c in CURVES) + "  dispatch/plain  forced/plain  dispatch tree")
        choice = (res.get("tree_choice") or {}).get("choice", {})
        for b in batches:
            row = [res.get(c, {}).get(b) for c in CURVES]
            cells = "  ".join(f"{r['tokens_per_s']:14.1f}" if r else f"{'-':>14}" for r in row)
            tps = {c: (r or {}).get("tokens_per_s") for c, r in zip(CURVES, row)}
            ratio = ["%14.2fx" % (tps[c] / tps["ours_plain"]) if tps[c] and tps["ours_plain"] else f"{'-':>15}"
                     for c in ("ours_dispatch", "ours_forced")]
            tree = (res.get("ours_dispatch", {}).get(b) or {}).get("tree") or choice.get(str(b), "")
            print(f"{b:5d}  {cells}  {ratio[0]} {ratio[1][2:]}  {tree}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (shape, res) in zip(axes[0], results.items()):
        for c in CURVES:
            pts = [(b, res[c][b]["tokens_per_s"]) for b in batches if res.get(c, {}).get(b)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s", title=shape)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


def split_schedules(shape: str, res: dict) -> dict:
    """Shape -> results: the pair's continuous-schedule curves as a shape of their own
    ("pair-continuous": their own table and plot panel)."""
    res = dict(res)
    more = res.pop("continuous", None)
    return {shape: res, **({f"{shape}-continuous": more} if more else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--shapes", default="pair,llama8b", help="pair, llama8b, smollm2, tiny")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--model", type=Path, default=REPO / "models/SmolLM2-135M-Instruct")
    ap.add_argument("--draft", type=Path, default=REPO / "drafts/smollm2-eagle-wide-eagle3",
                    help="the pair's draft (default: the shipped one; the runs recorded before "
                         "2026-12-01 used the first shipped draft, drafts/smollm2-eagle in git history)")
    ap.add_argument("--accept", type=Path, default=REPO / "bench/tables/smollm2-eagle-h100.accept.json",
                    help="the acceptance table the random-weight shapes' dispatcher and tokens/s use "
                         "(default: the first shipped SmolLM2 draft's, as in every recorded run)")
    ap.add_argument("--prompts", type=Path, default=REPO / "spec_compiler/data/prompts_dev.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--schedule", default="waves,continuous",
                    help="pair: waves (b prompts decoded together by generate_batch, the next b once all "
                    "ended) and/or continuous (b live at once through the slot API, a queued prompt "
                    "admitted as one ends: a server's batch; reported as the shape pair-continuous)")
    ap.add_argument("--engines", type=Path, default=REPO / "engines")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--build-only", action="store_true", help="compile the engines under --engines, time nothing")
    ap.add_argument("--merge", default="", metavar="A.json,B.json",
                    help="time nothing: join earlier runs' results (e.g. one per shape) into --out, with the plot")
    ap.add_argument("--only", default="", help="with --build-only, the engines to build (comma-separated: "
                    "ours_dispatch, ours_plain, ours_forced; default all; the pair's forced engine waits for "
                    "its dispatcher engine, which another process may be building)")
    ap.add_argument("--forced-tree", type=int, default=0, metavar="N",
                    help="pair: the forced engine's tree is fitted-N of --accept (default: the dispatcher "
                    "engine's batch-1 tree, so that engine is built first)")
    ap.add_argument("--draft-vocab", default="", metavar="N|shape=N,...",
                    help="random-weight shapes: the draft's lm_head over N hot tokens (default: bench_decode's, "
                    "32768 for llama8b; 0: the full vocabulary)")
    ap.add_argument("--forced-from-dispatch", action="store_true",
                    help="random-weight shapes: the forced curve from the speculative steps that the dispatcher "
                    "engine's measured dispatch timed at each bucket (its own tree there), not a third engine")
    ap.add_argument("--hf-methods", default="static,generate_batch",
                    help="the pair's transformers curve: static (static-cache generate) and/or generate_batch "
                    "(continuous batching); the faster at each batch is kept")
    ap.add_argument("--curves", default=",".join(CURVES),
                    help="the curves to measure (comma-separated; default all: " + ", ".join(CURVES) + "); two runs "
                    "on different GPUs can split them, and --merge joins their JSON")
    args = ap.parse_args(argv)
    if not args.curves or not set(args.curves.split(",")) <= set(CURVES):
        ap.error(f"--curves: a comma-separated subset of {', '.join(CURVES)}")
    if not args.hf_methods or not set(args.hf_methods.split(",")) <= {"static", "generate_batch"}:
        ap.error("--hf-methods: static, generate_batch or both (comma-separated)")
    if not args.schedule or not set(args.schedule.split(",")) <= {"waves", "continuous"}:
        ap.error("--schedule: waves, continuous or both (comma-separated)")
    if args.only and not args.build_only:
        ap.error("--only needs --build-only (the timed run uses all three engines)")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.merge:
        print("bench_batch: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    out = args.out or REPO / f"bench/results/batch_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" and not args.merge else args.device,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "ctx": CTX, "batches": batches}
    results = {}

    def write(partial: dict | None = None) -> None:
        text = json.dumps({"meta": meta, "results": {**results, **(partial or {})}}, indent=1, default=str)
        out.write_text(text.replace(f'"{REPO}/', '"') + "\n")  # the repository's files by relative path

    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        meta = {**runs[0]["meta"], "merged_from": [Path(f).name for f in args.merge.split(",")]}
        batches = meta["batches"]
        for run in runs:  # JSON made the batch keys strings; runs of one shape (split --curves) join
            for shape, res in run["results"].items():
                into = results.setdefault(shape, {})
                for c, rows in res.items():
                    if c in CURVES and isinstance(rows, dict):
                        into.setdefault(c, {}).update({int(b) if str(b).isdigit() else b: v for b, v in rows.items()})
                    elif isinstance(rows, dict) and isinstance(into.get(c), dict):  # per engine: join
                        into[c].update({k: v for k, v in rows.items() if v is not None})
                    elif rows is not None:
                        into[c] = rows
    else:
        args.engines.mkdir(parents=True, exist_ok=True)
        table = AcceptTable.read(args.accept)
        vocab = parse_draft_vocab(args.draft_vocab, [s for s in args.shapes.split(",") if s != "pair"])
        for shape in args.shapes.split(","):
            print(f"== {shape}", flush=True)
            save = (lambda res, shape=shape: write(split_schedules(shape, res))) if not args.build_only \
                else (lambda res: None)
            if shape == "pair":
                results.update(split_schedules(shape, bench_pair(args, batches, save)))
            else:
                results[shape] = bench_random(shape, batches, table, args.engines, args.device, args.build_only,
                                              tuple(x for x in args.only.split(",") if x), save,
                                              tuple(args.curves.split(",")), args.forced_from_dispatch,
                                              vocab.get(shape, 0))
        if args.build_only:
            print(f"built the engines under {args.engines}")
            return 0
    write()
    print(f"wrote {out}")
    table_and_plot(results, batches, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
