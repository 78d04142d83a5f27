"""Decode benchmarks on one GPU, one run: the project vs transformers, against the HBM roofline.

For each model shape (SmolLM2-135M, Llama-3.1-8B; random bf16 weights, the draft is one decoder
layer at the target's dimensions with the full lm_head), 128-token context:
  - spec-compiler non-speculative decode: the chain-0 verify graph (T=1), one CUDA-graph replay
  - the speculative step (mc_sim_7b_63, depth 5): draft graph, verify+accept graph, whole step
    (one CUDA graph), and ms/token at a given tokens-per-call (measured for the real SmolLM2 pair)
  - the same draft with a reduced ("hot-token") vocabulary of N tokens (--draft-vocab): its
    lm_head is N rows of the target's; draft graph time, its byte floor, and its ratio to the
    verify step (issue targets: under 30% of verify, within 1.2x of its byte floor)
  - sampling (temperature 1, top-p 0.9): the sampled verify graph and the whole sampled step
    against the greedy ones (issue target: the sampling epilogue under 3% of the step)
  - transformers eager, and transformers with its static cache + auto-compile (generate)
  - achieved HBM bandwidth of decode, verify and draft vs a measured device-to-device copy
Writes JSON (--out) and prints a table last.

    python bench/bench_decode.py [--shapes smollm2,llama8b] [--tpc 2.5] [--draft-vocab N | shape=N,...]
                                 [--engines DIR [--build-only]] [--skip-decode] [--no-peers]
                                 [--out bench/results/decode.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from spec_compiler.config import CompileConfig, DraftConfig, ModelConfig
from spec_compiler.models.eagle import EagleDraft
from spec_compiler.models.llama import Llama
from spec_compiler.pipeline import compile_modules
from spec_compiler.trees import chain, resolve_tree

SHAPES = {
    "smollm2": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30,
                           n_heads=9, n_kv_heads=3, head_dim=64, rope_theta=1e5,
                           tie_word_embeddings=True, eos_token_ids=(2,)),
    "llama8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32,
                           n_heads=32, n_kv_heads=8, head_dim=128, rope_theta=5e5,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           eos_token_ids=(128001,)),
}
CTX = 128
NEW = 128
# Hot-token draft vocabulary per shape: about a quarter of the vocabulary (FR-Spec and EAGLE-3
# report most of the acceptance kept at 16k-32k tokens of 49k-128k).
DRAFT_VOCAB = {"smollm2": 16384, "llama8b": 32768}
DRAFT_TARGETS = {"draft_over_verify": 0.30, "draft_vs_floor": 1.2}
SAMPLED_TOP_P = 0.9
SAMPLING_TARGET = 0.03  # the sampling epilogue under 3% of the step


def timed(fn, iters=50, warmup=5) -> float:
    """Median ms of fn() over iters, CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s counting bytes read + written."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), iters=20)
    return 2 * n / ms / 1e6


def random_modules(m: ModelConfig, seed=0, device="cuda"):
    torch.manual_seed(seed)
    with torch.device(device):
        target = Llama(m).to(torch.bfloat16)
        dcfg = DraftConfig(n_layers=1, fc_bias=True, has_embed=False, layer=m)
        draft = EagleDraft(dcfg, m).to(torch.bfloat16)
    for mod in (target, draft):
        for p in mod.parameters():
            torch.nn.init.normal_(p, 0.0, 0.02)
    draft.embed_tokens.weight = target.embed_tokens.weight
    draft.lm_head.weight = target.lm_head.weight
    return target, draft, dcfg


def hot_draft(target, draft, dcfg: DraftConfig, n: int, seed=0):
    """`draft` with a reduced vocabulary of n random hot tokens: the same fc and layers (shared),
    the target's embedding, lm_head = a copy of the target's rows of the hot ids (as load_draft
    builds it), hot_ids buffer. Built on the meta device, so no full-vocabulary tensor is allocated."""
    m = dcfg.layer
    if not 1 <= n <= m.vocab_size:
        raise ValueError(f"--draft-vocab {n}: must be in [1, {m.vocab_size}]")
    dev = target.lm_head.weight.device
    ids = torch.randperm(m.vocab_size, generator=torch.Generator().manual_seed(seed))[:n].to(dev)
    hcfg = dataclasses.replace(dcfg, draft_vocab_size=n)
    with torch.device("meta"):
        hot = EagleDraft(hcfg, m)
    hot.fc, hot.layers = draft.fc, draft.layers
    hot.embed_tokens.weight = target.embed_tokens.weight
    hot.lm_head.weight = torch.nn.Parameter(target.lm_head.weight.detach().index_select(0, ids),
                                            requires_grad=False)
    hot._buffers["hot_ids"] = ids
    hot._buffers["inv_freq"] = draft.inv_freq
    assert not any(t.is_meta for t in [*hot.parameters(), *hot.buffers()])
    return hot.eval(), hcfg


def parse_draft_vocab(spec: str, shapes: list[str]) -> dict[str, int]:
    """--draft-vocab: "N" for every shape, "shape=N,..." per shape (others keep the default), or
    "0" for none (full vocabulary only)."""
    out = {s: DRAFT_VOCAB.get(s, 0) for s in shapes}
    if spec.strip() == "":
        return out
    for part in spec.split(","):
        name, _, n = part.rpartition("=")
        if name and name not in SHAPES:
            raise SystemExit(f"--draft-vocab {spec!r}: unknown shape {name!r} ({', '.join(SHAPES)})")
        try:
            n = int(n)
        except ValueError:
            raise SystemExit(f"--draft-vocab {spec!r}: expected N, 0 or shape=N,...") from None
        for s in [name] if name else shapes:
            if s in out:
                out[s] = n
    return {s: n for s, n in out.items() if n > 0}


def nbytes(mod, skip=()) -> int:
    seen, total = set(), 0
    for n, p in mod.named_parameters():
        if p.data_ptr() in seen or any(n.startswith(s) for s in skip):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def build_engine_dir(m, target, draft, dcfg, tree, graphs, root: Path, name: str, device="cuda",
                     backend="inductor") -> Path:
    """Compile an engine of random-weight modules (graphs=None: every graph the tree needs)."""
    cfg = CompileConfig(model=m, draft=dcfg if tree.n_nodes > 1 else None, tree=tree,
                        max_seq_len=1024, dtype="bfloat16", device=device, prefill_chunk=64,
                        backend=backend)
    return compile_modules(cfg, target, draft if tree.n_nodes > 1 else None, root / name,
                           progress=lambda s: print("  " + s, flush=True), graphs=graphs)


BUILD_ONLY = False  # --build-only: compile the engines under --engines, time nothing
SKIP_DECODE = False  # --skip-decode: no chain-0 engine (the speculative and sampled step only)


class BuiltOnly(Exception):
    pass


def build(m, target, draft, dcfg, tree, graphs, root: Path, name: str, device="cuda", backend="inductor"):
    """Compile (or, when root/name holds an engine built earlier by this script with the same
    seed, reuse) and load one engine. Returns (engine, compile seconds or None if reused, load s)."""
    from spec_compiler.runtime import Engine

    t = time.time()
    out, compile_s = root / name, None
    if not (out / "manifest.json").is_file():
        out = build_engine_dir(m, target, draft, dcfg, tree, graphs, root, name, device, backend)
        compile_s = time.time() - t
        print(f"  built {name} in {compile_s:.0f} s", flush=True)
    if BUILD_ONLY:
        return None, compile_s, None
    t = time.time()
    eng = Engine.load(out)
    load_s = time.time() - t
    return eng, compile_s, load_s


def step_ms(eng, **sampling) -> float:
    """One captured step (replay) from a random CTX-token context (the runtime's public
    start_synthetic; `sampling`: temperature, top_p for the sampled step): the context then
    grows by the tokens each step accepts, as in a real generation from a CTX-token prompt (by
    about 50 tokens over the timed steps)."""
    eng.start_synthetic(CTX, **sampling)
    eng.capture()
    eng.start_synthetic(CTX, **sampling)
    return timed(eng.step)


def graph_ms(eng, name: str, sampling: dict | None = None, **args) -> float:
    """A single step graph (the runtime's public per-graph call) captured alone."""
    from spec_compiler.runtime.cuda_graph import CapturedStep

    eng.start_synthetic(CTX, **(sampling or {}))
    cap = CapturedStep(lambda: eng.call(name, **args))
    return timed(cap)


def hf_peers(m: ModelConfig, results: dict, skip_compile=False):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_hidden_layers=m.n_layers,
                       num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                       head_dim=m.head_dim, tie_word_embeddings=m.tie_word_embeddings,
                       max_position_embeddings=4096)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
    prompt = torch.randint(3, m.vocab_size, (1, CTX), device="cuda")

    def run(gc):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate(prompt, generation_config=gc)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1000 / (out.shape[1] - CTX)

    eager = GenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    run(eager)
    results["hf_eager_ms_per_token"] = run(eager)
    if not skip_compile:
        static = GenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                                  cache_implementation="static")
        t = time.time()
        run(static)
        run(static)
        results["hf_static_compile_warmup_s"] = time.time() - t
        results["hf_static_compiled_ms_per_token"] = run(static)
    del hf
    torch.cuda.empty_cache()


def draft_bytes(tree, w_draft_layer: int, vocab_rows: int, hidden: int) -> int:
    """Bytes a draft step must read: every forward (catch-up + each level with children) reads
    the layer weights and the lm_head rows it scores (bf16). Embedding rows, the KV cache and the
    hot-id lookups are negligible."""
    forwards = 1 + sum(1 for d in range(1, tree.max_depth) if tree.level_nodes(d))
    return forwards * (w_draft_layer + vocab_rows * hidden * 2)


def bench_shape(name: str, tpc: float, bw: float, root: Path, peers: bool, draft_vocab: int | None = None,
                save=lambda r: None) -> dict:
    m = SHAPES[name]
    print(f"== {name}", flush=True)
    target, draft, dcfg = random_modules(m)
    r: dict = {"shape": name}
    # Non-speculative decode: the chain-0 verify graph (one token).
    if not SKIP_DECODE:
        dec, r["decode_compile_s"], r["decode_load_s"] = build(m, target, None, None, chain(0), ["verify"],
                                                               root, f"{name}_decode")
    if BUILD_ONLY:
        build(m, target, draft, dcfg, resolve_tree("mc_sim_7b_63"), ["verify", "verify_sampled", "draft"],
              root, f"{name}_spec")
        if draft_vocab:
            hot, hcfg = hot_draft(target, draft, dcfg, draft_vocab)
            build(m, target, hot, hcfg, resolve_tree("mc_sim_7b_63"), ["draft"], root, f"{name}_hot")
        raise BuiltOnly
    if not SKIP_DECODE:
        r["decode_ms_per_token"] = step_ms(dec)
        del dec
    # Speculative step with the default tree.
    tree = resolve_tree("mc_sim_7b_63")
    spec, r["spec_compile_s"], r["spec_load_s"] = build(m, target, draft, dcfg, tree,
                                                        ["verify", "verify_sampled", "draft"], root, f"{name}_spec")
    r["step_ms"] = step_ms(spec)
    tokens = torch.randint(0, m.vocab_size, (1, tree.n_nodes), device="cuda")
    r["verify_ms"] = graph_ms(spec, "verify", tokens=tokens)
    r["draft_ms"] = graph_ms(spec, "draft")
    r["accept_and_glue_ms"] = r["step_ms"] - r["verify_ms"] - r["draft_ms"]
    # Sampling (temperature 1, top-p 0.9): the sampled verify graph (warp + tree rejection
    # sampling in the epilogue) and the whole sampled step, against the greedy ones.
    samp = {"temperature": 1.0, "top_p": SAMPLED_TOP_P}
    r["verify_sampled_ms"] = graph_ms(spec, "verify_sampled", sampling=samp, tokens=tokens)
    r["step_sampled_ms"] = step_ms(spec, **samp)
    r["sampling_cost_ms"] = r["verify_sampled_ms"] - r["verify_ms"]
    r["sampling_cost_of_step"] = r["sampling_cost_ms"] / r["step_ms"]
    r["tokens_per_call"] = tpc
    r["spec_ms_per_token"] = r["step_ms"] / tpc
    del spec
    # Bytes that must move (weights; the 128-token KV cache is negligible but counted).
    w_target = nbytes(target)
    kv = 2 * m.n_layers * m.n_kv_heads * m.head_dim * CTX * 2
    w_draft_layer = nbytes(draft, skip=("embed_tokens", "lm_head"))
    r["bytes_decode"] = w_target + kv
    r["bytes_draft"] = draft_bytes(tree, w_draft_layer, m.vocab_size, m.hidden_size)
    r["floor_decode_ms"] = r["bytes_decode"] / bw / 1e6
    r["floor_draft_ms"] = r["bytes_draft"] / bw / 1e6
    r["verify_bw_frac"] = r["floor_decode_ms"] / r["verify_ms"]
    r["draft_vs_floor"] = r["draft_ms"] / r["floor_draft_ms"]
    if not SKIP_DECODE:
        r["decode_bw_frac"] = r["floor_decode_ms"] / r["decode_ms_per_token"]
        r["verify_over_decode"] = r["verify_ms"] / r["decode_ms_per_token"]
    r["draft_over_verify"] = r["draft_ms"] / r["verify_ms"]
    if draft_vocab:  # the same draft with a hot-token lm_head of N rows (draft graph alone)
        hot, hcfg = hot_draft(target, draft, dcfg, draft_vocab)
        eng, r["hot_draft_compile_s"], _ = build(m, target, hot, hcfg, tree, ["draft"], root, f"{name}_hot")
        r["draft_vocab"] = draft_vocab
        r["hot_draft_ms"] = graph_ms(eng, "draft")
        r["bytes_hot_draft"] = draft_bytes(tree, w_draft_layer, draft_vocab, m.hidden_size)
        r["floor_hot_draft_ms"] = r["bytes_hot_draft"] / bw / 1e6
        r["hot_draft_vs_floor"] = r["hot_draft_ms"] / r["floor_hot_draft_ms"]
        r["hot_draft_over_verify"] = r["hot_draft_ms"] / r["verify_ms"]
        r["hot_draft_meets_targets"] = (r["hot_draft_over_verify"] < DRAFT_TARGETS["draft_over_verify"]
                                        and r["hot_draft_vs_floor"] <= DRAFT_TARGETS["draft_vs_floor"])
        del eng, hot
    del target, draft
    torch.cuda.empty_cache()
    save(r)  # ours is complete: keep it even if the peers run out of time
    if peers:
        hf_peers(m, r)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2,llama8b")
    ap.add_argument("--tpc", type=float, default=2.5, help="tokens per call for ms/token of the spec step")
    ap.add_argument("--draft-vocab", default="",
                    help="hot-token draft vocabulary: N (every shape), shape=N,... or 0 for none "
                         f"(default {','.join(f'{k}={v}' for k, v in DRAFT_VOCAB.items())})")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--engines", type=Path, default=None,
                    help="keep the compiled engines here and reuse those found (same random weights: "
                         "seed 0); default: a temporary folder")
    ap.add_argument("--build-only", action="store_true", help="compile the engines under --engines, then stop")
    ap.add_argument("--skip-decode", action="store_true",
                    help="no non-speculative (chain-0) engine: time the speculative and sampled step only")
    ap.add_argument("--out", default="bench/results/decode.json")
    args = ap.parse_args(argv)
    global BUILD_ONLY, SKIP_DECODE
    BUILD_ONLY, SKIP_DECODE = args.build_only, args.skip_decode
    if args.build_only and args.engines is None:
        ap.error("--build-only needs --engines DIR")
    shapes = args.shapes.split(",")
    vocab = parse_draft_vocab(args.draft_vocab, shapes)
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = 0.0 if args.build_only else copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "copy_bandwidth_GBps": bw, "context": CTX, "new_tokens": NEW,
           "shapes": []}
    print(f"device {res['device']}  copy bandwidth {bw:.0f} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.engines or Path(tmp)
        for name in shapes:
            def save(partial, done=list(res["shapes"])):
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({**res, "shapes": done + [partial]}, indent=1))

            try:
                r = bench_shape(name, args.tpc, bw, root, not args.no_peers, vocab.get(name), save)
            except BuiltOnly:
                continue
            res["shapes"].append(r)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    if args.build_only:
        print(f"built under {root}")
        return 0
    print(f"\n{res['device']}, copy bw {bw:.0f} GB/s, ctx {CTX}")
    hdr = ("shape", "decode ms/tok", "%roofline", "verify ms", "verify/decode", "draft ms", "draft/floor",
           "step ms", f"spec ms/tok@{args.tpc}", "HF eager", "HF static+compile")
    print(" | ".join(hdr))
    for r in res["shapes"]:
        nan = float("nan")
        print(" | ".join([r["shape"], f"{r.get('decode_ms_per_token', nan):.3f}",
                          f"{100 * r.get('decode_bw_frac', nan):.0f}%",
                          f"{r['verify_ms']:.3f}", f"{r.get('verify_over_decode', nan):.2f}x", f"{r['draft_ms']:.3f}",
                          f"{r['draft_vs_floor']:.2f}x", f"{r['step_ms']:.3f}", f"{r['spec_ms_per_token']:.3f}",
                          f"{r.get('hf_eager_ms_per_token', float('nan')):.2f}",
                          f"{r.get('hf_static_compiled_ms_per_token', float('nan')):.2f}"]))
    print(f"\nsampling (T=1, top-p {SAMPLED_TOP_P}) vs greedy (target: epilogue < "
          f"{100 * SAMPLING_TARGET:.0f}% of the step)")
    print(" | ".join(("shape", "verify ms", "verify_sampled ms", "epilogue cost", "of step", "step ms",
                      "sampled step ms")))
    for r in res["shapes"]:
        print(" | ".join([r["shape"], f"{r['verify_ms']:.3f}", f"{r['verify_sampled_ms']:.3f}",
                          f"{r['sampling_cost_ms']:.3f} ms", f"{100 * r['sampling_cost_of_step']:.1f}%",
                          f"{r['step_ms']:.3f}", f"{r['step_sampled_ms']:.3f}"]))
    hot = [r for r in res["shapes"] if "draft_vocab" in r]
    if hot:
        print(f"\ndraft, depth 5, full vs hot-token vocabulary (targets: draft/verify < "
              f"{DRAFT_TARGETS['draft_over_verify']:.2f}, draft/floor <= {DRAFT_TARGETS['draft_vs_floor']:.1f}x)")
        print(" | ".join(("shape", "vocab", "draft ms", "floor ms", "draft/floor", "draft/verify", "targets met")))
        for r in hot:
            print(" | ".join([r["shape"], f"full {SHAPES[r['shape']].vocab_size}", f"{r['draft_ms']:.3f}",
                              f"{r['floor_draft_ms']:.3f}", f"{r['draft_vs_floor']:.2f}x",
                              f"{r['draft_over_verify']:.2f}", "-"]))
            print(" | ".join([r["shape"], f"hot {r['draft_vocab']}", f"{r['hot_draft_ms']:.3f}",
                              f"{r['floor_hot_draft_ms']:.3f}", f"{r['hot_draft_vs_floor']:.2f}x",
                              f"{r['hot_draft_over_verify']:.2f}",
                              "yes" if r["hot_draft_meets_targets"] else "no"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
