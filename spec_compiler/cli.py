"""Console entry points: `spec-compile` and `spec-run`. `*_main(argv)` are testable.

Bad input (SpecCompileError) prints one line `error: ...` and exits 2, with no traceback; an
unexpected exception one line `error: internal error: ...` and exits 1 (`errors.cli_entry`;
`--verbose` shows its traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from pathlib import Path

from .errors import SpecCompileError, add_verbose_flag, cli_entry
from .kernels.limits import MAX_PREFILL_CHUNK, MAX_TREE_NODES


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-compile", description=(
        "Compile a Hugging Face Llama checkpoint and an EAGLE draft head into a speculative-"
        "decoding engine directory."))
    p.add_argument("model_dir", type=Path, help="Hugging Face Llama checkpoint directory")
    p.add_argument("--draft", type=Path, default=None,
                   help="EAGLE-1/2 draft head directory (required unless --tree chain-0)")
    p.add_argument("--draft-vocab", default="auto", metavar="{auto,full,N}",
                   help="tokens the draft scores: auto (default) = the draft's hot-token list (d2t) "
                        "if it has one, else all; full = the target's whole vocabulary; N = the "
                        "first N of the hot list. Output is unchanged, only acceptance may drop")
    p.add_argument("--out", type=Path, required=True, help="engine directory to create")
    p.add_argument("--tree", default="auto",
                   help="auto (default): per batch bucket, the tree with the most expected "
                        "tokens/s at that batch on the build device, from the draft's acceptance "
                        "table (accept.json, spec-fit-tree) and a cost model timed at compile "
                        "time (chains, chain-0 = no speculation, fitted trees, the draft's "
                        "tree.json); without accept.json the draft's tree.json, else "
                        "mc_sim_7b_63. Or mc_sim_7b_63, chain-K, fitted-N (the best N-node tree of "
                        "the draft's acceptance table), or a JSON file of EAGLE tree paths, built at "
                        f"every bucket; at most {MAX_TREE_NODES} nodes with the root")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="engine capacity in tokens, scratch room for one tree included (default 2048)")
    p.add_argument("--backend", choices=("inductor", "eager", "onnx"), default="inductor",
                   help="inductor (default): AOTInductor packages; onnx: ONNX graphs run with ONNX "
                        "Runtime (needs the onnx extra); eager: for debugging only")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help=f"prompt tokens per prefill call (default 64, at most {MAX_PREFILL_CHUNK})")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="the most sequences decoded at once (default 1): step graphs are built for "
                        "batch buckets 1, 2, 4, ... up to N, N included; state for N slots")
    p.add_argument("--no-sampling", dest="sampling", action="store_false",
                   help="greedy only: skip the sampling verify graph (temperature > 0), one graph "
                        "less to compile")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks (default 1): the target's heads and MLP split over N "
                        "GPUs (N processes on CPU), one weights file per rank; N must divide the KV "
                        "heads or be a multiple of them")
    p.add_argument("--tp-lm-head", choices=("replicated", "vocab"), default="replicated",
                   help="with --tp N: the lm_head replicated on every rank (default), or sharded by "
                        "vocabulary (each rank reads 1/N of it; an all-gather of the logits per call)")
    p.add_argument("--dispatch", choices=("measured", "predicted"), default="measured",
                   help="with --tree auto: measured (default) builds every bucket both speculating "
                        "(where the cost model chose plain decoding: with its best tree, when some bucket "
                        "speculates) and plain, and with a smaller tree of the same depth predicted "
                        "within 5%% of its choice, times the compiled steps there and keeps the fastest "
                        "(expected tokens per call / step time); predicted trusts the cost model "
                        "(fewer graphs to compile). Single-GPU engines only: at --tp N it is predicted")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="graphs lowered in parallel, one process each (default: one per 2 CPU "
                        "cores, at most 8; 1: one after another in this process)")
    p.add_argument("--debug-dir", type=Path, default=None, help="dump the graph after every pass")
    return add_verbose_flag(p)


@cli_entry(interrupted="interrupted: no engine written")
def compile_main(argv: list[str] | None = None) -> int:
    args = compile_parser().parse_args(argv)
    from .config import CompileConfig, ModelConfig
    from .fileio import check_new_dir, check_writable_dir
    from .loading import parse_draft_vocab, read_draft
    from .pipeline import compile_engine

    # Where the results go, before any work (the engine is renamed into place at the end).
    check_new_dir(args.out, "--out")
    if args.debug_dir is not None:
        check_writable_dir(args.debug_dir, "--debug-dir")
    draft_vocab = parse_draft_vocab(args.draft_vocab)
    if args.jobs is not None and args.jobs < 1:
        raise SpecCompileError(f"--jobs {args.jobs}: must be at least 1")
    tree, auto_tree = _auto_tree(args.tree, args.draft)
    model = ModelConfig.from_hf(args.model_dir)
    draft = None
    if args.draft is not None:
        if not args.draft.is_dir():
            raise SpecCompileError(f"--draft {args.draft}: no such directory")
        # Read and checked once, before the (slow) target load: shapes, d2t/t2d, --draft-vocab.
        draft = read_draft(args.draft, model, draft_vocab)
    elif draft_vocab != "auto":
        raise SpecCompileError(f"--draft-vocab {draft_vocab}: needs --draft DRAFT_DIR")
    cfg = CompileConfig(model=model, draft=None if draft is None else draft.cfg, tree=tree,
                        max_seq_len=args.max_seq_len, backend=args.backend,
                        dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
                        device=args.device, prefill_chunk=args.prefill_chunk, sampling=args.sampling,
                        batch_size=args.max_batch, tp=args.tp, tp_lm_head=args.tp_lm_head)
    compile_engine(cfg, args.model_dir, draft if tree.n_nodes > 1 else None, args.out,
                   debug_dir=args.debug_dir, draft_vocab=draft_vocab, auto_tree=auto_tree,
                   jobs=args.jobs, measured_dispatch=args.dispatch == "measured")
    return 0


def _auto_tree(tree: str, draft: Path | None):
    """(the tree to build, the chooser that may replace it once the models are loaded).
    An explicit --tree is built as given. --tree auto with a draft that ships its acceptance
    table (DRAFT_DIR/accept.json, spec-fit-tree) picks, on the build device, the candidate tree
    with the most expected tokens per second (spec_compiler/tree_choice.py); without one it is
    the draft's tree.json, else mc_sim_7b_63."""
    from .tree_choice import auto_tree, fitted_tree
    from .trees import resolve_tree

    if tree != "auto":
        return fitted_tree(tree, draft) or resolve_tree(tree), None
    return auto_tree(draft if draft is not None and draft.is_dir() else None,
                     lambda s: print(s, file=sys.stderr))


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-run", description="Generate with a compiled engine.")
    p.add_argument("engine_dir", type=Path)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text; the chat template is applied when the model has one")
    g.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--prompts-file", type=Path, metavar="FILE.jsonl",
                   help='many prompts, decoded as a batch: one JSON object per line, {"prompt": '
                        '"..."} (chat template applied) or {"prompt_ids": [...]}, optionally with '
                        'its own "max_new_tokens", "temperature", "top_p", "top_k", "seed" (the '
                        "flags are the default; --seed S gives prompt i, from 0, the seed S + i)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: until EOS or the engine's capacity")
    p.add_argument("--temperature", default="0", metavar="T",
                   help="0 (default): greedy, token-identical to the target's greedy decoding; "
                        "> 0: sampled, exactly the target's distribution (speculative sampling)")
    p.add_argument("--top-p", default="1", metavar="P", help="nucleus: (0, 1], 1 (default) is none")
    p.add_argument("--top-k", default="0", metavar="K", help="the K most likely tokens; 0 (default) is none")
    p.add_argument("--seed", default=None, metavar="S",
                   help="sampling seed (an integer); default: a fresh one, printed, to replay the run")
    p.add_argument("--json", action="store_true", help="print one JSON object (with the seed); with "
                   "--prompts-file one per prompt, in input order, then a summary line")
    add_tp_flag(p)
    return add_verbose_flag(p)


def add_tp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor-parallel ranks: read from the engine (it starts them itself); if "
                        "given, it must be the engine's")


def stats(line: str) -> None:
    """A run's closing stats line, on stderr; from tensor-parallel rank 0 only."""
    from spec_compiler.runtime.tp import rank

    if rank() == 0:
        print(line, file=sys.stderr)


def tensor_parallel(entry: str, argv: list[str] | None, args, knobs: dict | None = None) -> int | None:
    """A TP engine: from a plain start, start its ranks (`entry` with the same arguments) and
    return their exit status; in a rank (started so, or by torchrun), join the process group,
    take rank 0's seed (`knobs`), return None. A single-device engine: None."""
    from spec_compiler.runtime import tp as ranks

    tp, device = ranks.engine_tp(args.engine_dir, args.tp)
    if tp > 1 and not ranks.launched():
        return ranks.launch(entry, sys.argv[1:] if argv is None else argv, tp, device)
    if ranks.launched():
        ranks.join(tp, device)
    if tp > 1 and knobs is not None:
        knobs["seed"] = ranks.same(knobs["seed"] if knobs["seed"] is not None else secrets.randbits(63))
    return None


def parse_sampling(args) -> dict:
    """--temperature/--top-p/--top-k/--seed as Engine.generate's keywords, checked (one line)."""
    from spec_compiler.runtime.generate import check_sampling

    def num(flag, text, kind):
        try:
            return kind(text)
        except ValueError:
            raise SpecCompileError(f"{flag} {text!r}: not a{'n integer' if kind is int else ' number'}") from None

    t = num("--temperature", args.temperature, float)
    p = num("--top-p", args.top_p, float)
    k = num("--top-k", args.top_k, int)
    seed = None if args.seed is None else num("--seed", args.seed, int)
    check_sampling(t, p, k, seed)  # refuse bad values before loading anything
    return {"temperature": t, "top_p": p, "top_k": k, "seed": seed}


@cli_entry()
def run_main(argv: list[str] | None = None) -> int:
    args = run_parser().parse_args(argv)
    from spec_compiler.runtime import Engine

    if args.prompt_ids is not None:
        ids = parse_prompt_ids(args.prompt_ids)
    knobs = parse_sampling(args)
    lines = read_prompts_file(args.prompts_file) if args.prompts_file is not None else None
    status = tensor_parallel("spec_compiler.cli:run_main", argv, args, knobs)
    if status is not None:
        return status
    t0 = time.perf_counter()
    engine = Engine.load(args.engine_dir)
    load_s = time.perf_counter() - t0
    if lines is not None:
        return _run_batch(engine, lines, args, knobs, load_s)
    if args.prompt is not None:
        ids = engine.encode_prompt(args.prompt)
    res = engine.generate(ids, max_new_tokens=args.max_new_tokens, **knobs)
    res.text = engine.decode(res.output_ids)
    if args.json:
        print(json.dumps(res.to_json() | {"load_seconds": load_s}))
    else:
        if res.text is not None:
            print(res.text)
        else:
            print(",".join(map(str, res.output_ids)))
        tps = len(res.output_ids) / res.seconds if res.seconds else float("nan")
        seed = "" if res.seed is None else f", seed {res.seed}"
        stats(f"[load {load_s:.2f} s | {len(res.output_ids)} tokens in {res.seconds:.2f} s: {tps:.1f} "
              f"tokens/s, {res.tokens_per_call:.2f} tokens/call over {res.verify_calls} verify calls, "
              f"stop: {res.stop_reason}{seed}]")
    return 0


PROMPT_LINE_KEYS = ("prompt", "prompt_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed")
MAX_PROMPTS_BYTES = 256 << 20


def read_prompts_file(path: Path) -> list[dict]:
    """--prompts-file: one JSON object per non-empty line, each with exactly one of "prompt"
    (text) or "prompt_ids" (token ids), optionally "max_new_tokens", "temperature", "top_p",
    "top_k", "seed"; each value checked here (`FILE:LINE: ...`), before the engine loads."""
    from spec_compiler.fileio import parse_json, read_bounded
    from spec_compiler.runtime.generate import check_sampling

    raw = read_bounded(path, "--prompts-file", MAX_PROMPTS_BYTES, "split it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecCompileError(f"--prompts-file {path}: not UTF-8 text") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--prompts-file {path}:{n}"
        d = parse_json(line, where, 'write one JSON object per line, e.g. {"prompt_ids": [1, 2, 3]}')
        if not isinstance(d, dict):
            raise SpecCompileError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\"}}")
        unknown = sorted(set(d) - set(PROMPT_LINE_KEYS))
        if unknown:
            raise SpecCompileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(PROMPT_LINE_KEYS)})")
        if ("prompt" in d) == ("prompt_ids" in d):
            raise SpecCompileError(f'{where}: give exactly one of "prompt" (text) or "prompt_ids" (token ids)')
        if "prompt" in d and not isinstance(d["prompt"], str):
            raise SpecCompileError(f'{where}: "prompt" must be a string (token ids go in "prompt_ids")')
        ids = d.get("prompt_ids")
        if ids is not None and not (isinstance(ids, list) and ids
                                    and all(type(t) is int and t >= 0 for t in ids)):
            raise SpecCompileError(f'{where}: "prompt_ids" must be a non-empty list of token ids (integers >= 0)')
        m = d.get("max_new_tokens")
        if m is not None and (type(m) is not int or m < 1):
            raise SpecCompileError(f"{where}: max_new_tokens {m!r} must be an integer >= 1")
        try:
            check_sampling(d.get("temperature", 0.0), d.get("top_p", 1.0), d.get("top_k", 0), d.get("seed"))
        except SpecCompileError as e:
            raise SpecCompileError(f"{where}: {str(e).removeprefix('--')}") from None
        out.append(d)
    if not out:
        raise SpecCompileError(f"--prompts-file {path}: no prompts in it (one JSON object per line)")
    return out


def _run_batch(engine, lines: list[dict], args, knobs: dict, load_s: float) -> int:
    """--prompts-file: every line through Engine.generate_batch, printed in input order."""
    prompts = [d["prompt_ids"] if "prompt_ids" in d else engine.encode_prompt(d["prompt"]) for d in lines]
    seed = knobs["seed"]
    per_line = {
        "max_new_tokens": [d.get("max_new_tokens", args.max_new_tokens) for d in lines],
        "temperature": [d.get("temperature", knobs["temperature"]) for d in lines],
        "top_p": [d.get("top_p", knobs["top_p"]) for d in lines],
        "top_k": [d.get("top_k", knobs["top_k"]) for d in lines],
        "seed": [d.get("seed", None if seed is None else seed + i) for i, d in enumerate(lines)],
    }
    t0 = time.perf_counter()
    results = engine.generate_batch(prompts, **per_line)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in results)
    calls = sum(r.verify_calls for r in results)
    summary = {"sequences": len(results), "tokens": tokens, "seconds": seconds,
               "tokens_per_second": tokens / seconds if seconds > 0 else None,
               "tokens_per_call": sum(sum(r.accept_lengths) for r in results) / calls if calls else 0.0,
               "load_seconds": load_s}
    for r in results:
        r.text = engine.decode(r.output_ids)
        if args.json:
            print(json.dumps(r.to_json() | {"load_seconds": load_s}))
        else:
            print(r.text if r.text is not None else ",".join(map(str, r.output_ids)))
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        stats(f"[load {load_s:.2f} s | {len(results)} sequences, {tokens} tokens in {seconds:.2f} s: "
              f"{summary['tokens_per_second'] or float('nan'):.1f} tokens/s, "
              f"{summary['tokens_per_call']:.2f} tokens/call over {calls} verify calls]")
    return 0


def parse_prompt_ids(text: str) -> list[int]:
    """`--prompt-ids 1,2,3`: comma-separated decimal integers (ASCII digits, spaces around them
    allowed), nothing else: not `1_2`, not `+1`, not other scripts' digits."""
    items = text.split(",")
    for x in items:
        if not re.fullmatch(r" *[0-9]{1,18} *", x):
            raise SpecCompileError(f"--prompt-ids {text!r}: {x.strip()!r} is not a token id; expected "
                                   "comma-separated integers such as 1,2,3")
    return [int(x) for x in items]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(compile_main())
