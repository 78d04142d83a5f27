"""`spec-fit-tree MODEL_DIR DRAFT_DIR`: the static tree that suits one draft, from data.

A static tree is a set of rank paths: `(0, 2)` is the parent's top-1 candidate, then that
node's third. At a verify call, node (r1..rd) is accepted exactly when, at every level k <= d,
the target's token was the draft's rank-rk candidate. So over many start positions:

    tokens per verify call = 1 + sum over nodes of P(ranks begin with the node's path)

and since a prefix is at least as likely as any of its extensions, the best tree of N nodes is
just the N - 1 most frequent rank prefixes (with the root), prefix-closed by construction.

The frequencies come from the target's own greedy continuations of prompts the draft did not
train on (`prompts_fit.jsonl` by default; a table fitted on the training prompts overstates
acceptance, and the development prompts stay held out for measuring): at every start position the draft runs level
by level the way a tree node does (its own features, the target's true token as the path) and
records the rank of the target's next token among its candidates (a token outside a hot
vocabulary, or past --top-k, ends the path). EAGLE's mc_sim_7b_63 was fitted the same way to a
Vicuna-7B draft; a weaker draft on a small target wants a wider, shallower tree.

Writes DRAFT_DIR/tree.json (the paths) and DRAFT_DIR/accept.json (the acceptance table: the
most frequent rank paths with their frequencies, the command and settings that made it, the
draft weights' sha256), and prints the fitted tree's expected tokens per call beside
mc_sim_7b_63 and chains on the same data. `spec-compile --tree auto` (the default) weighs the
table's trees by their cost on the build device (spec_compiler/tree_choice.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import SpecCompileError, add_verbose_flag, cli_entry
from ..fileio import atomic_write_text
from ..hashing import sha256_file
from ..kernels.limits import MAX_TREE_NODES
from ..models.eagle import EagleDraft
from ..tree_choice import ACCEPT, AcceptTable, best_tree, draft_weights_sha256, expected_tpc, ranked
from ..trees import resolve_tree
from .generate import Sequence

__all__ = ["rank_paths", "prefix_rates", "best_tree", "expected_tpc", "main"]


@torch.no_grad()
def rank_paths(draft: EagleDraft, seqs: list[Sequence], depth: int, top_k: int) -> list[tuple[int, ...]]:
    """One tuple per start position: the target token's rank at each level, cut at the first
    rank >= top_k (or a token the draft cannot propose)."""
    dev = draft.fc.weight.device
    col = None  # target id -> logit column (hot vocabulary), -1 where the draft cannot propose it
    if draft.hot_ids is not None:
        col = torch.full((draft.cfg.layer.vocab_size,), -1, dtype=torch.long, device=dev)
        col[draft.hot_ids] = torch.arange(draft.hot_ids.numel(), device=dev)
    out: list[tuple[int, ...]] = []
    for s in seqs:
        x, f, P, L = s.tokens.to(dev), s.features.to(dev), s.prompt_len, len(s.tokens)
        starts = torch.arange(P - 1, L - 1 - depth, device=dev)  # x[i + 1 + depth] exists
        if starts.numel() == 0:
            continue
        T, M = L - 1, starts.numel()
        kv = [torch.zeros(draft.cache_shape(1, T + depth), device=dev, dtype=draft.fc.weight.dtype)
              for _ in range(2 * draft.cfg.n_layers)]
        # Level 1 for every start at once: the teacher-forced pass over the true pairs.
        logits, g, *kv = draft(x[None, 1:], f[None, :-1], torch.arange(T, device=dev)[None],
                               torch.zeros(1, dtype=torch.long, device=dev), *kv)
        logits, g = logits[0, starts], g[0, starts][:, None]  # (M, V), (M, 1, H)
        kv = [c.expand(M, -1, -1, -1) for c in kv]
        ranks = []
        for d in range(depth):
            want = x[starts + 2 + d]  # the target's token at level d + 1
            c = want if col is None else col[want]
            hit = c >= 0
            lw = logits.gather(1, c.clamp(min=0)[:, None])  # (M, 1)
            r = (logits > lw).sum(-1)
            ranks.append(torch.where(hit, r, torch.full_like(r, top_k)))
            if d + 1 == depth:
                break
            # The accepted node's token is the target's: feed it with the draft's own feature.
            pos = starts + d + 1
            logits, g, *kv = draft(want[:, None], g, pos[:, None], pos, *kv)
            logits = logits[:, 0]
        R = torch.stack(ranks, 1).cpu().tolist()  # (M, depth)
        for row in R:
            n = next((k for k, r in enumerate(row) if r >= top_k), depth)
            out.append(tuple(row[:n]))
    if not out:
        raise SpecCompileError("fit-tree: no continuation is long enough to score")
    return out


def prefix_rates(paths: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    """P(the recorded ranks begin with p) for every non-empty prefix p seen."""
    c: Counter = Counter()
    for p in paths:
        for k in range(1, len(p) + 1):
            c[p[:k]] += 1
    return {p: n / len(paths) for p, n in c.items()}


@cli_entry(interrupted="interrupted: no tree written")
def main(argv: list[str] | None = None) -> int:
    from ..loading import load_draft, load_target
    from .data import DEFAULT_FIT_PROMPTS
    from .generate import greedy_continuations

    p = argparse.ArgumentParser(prog="spec-fit-tree", description=(
        "Fit a static speculation tree to a draft head: the N rank paths the target accepts "
        "most often on its own continuations of a prompt set. Writes DRAFT_DIR/tree.json and "
        f"DRAFT_DIR/{ACCEPT} (the acceptance table --tree auto weighs trees with)."))
    p.add_argument("model_dir", type=Path)
    p.add_argument("draft_dir", type=Path)
    p.add_argument("--prompts", type=Path, default=DEFAULT_FIT_PROMPTS,
                   help="prompt file: prompts the draft did not train on (default: the packaged "
                   "prompts_fit.jsonl, which spec-train's default prompts exclude; keep dev held out)")
    p.add_argument("--n", type=int, default=64, help="first N prompts of the file (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--nodes", type=int, default=26,
                   help=f"tree nodes with the root (default 26, at most {MAX_TREE_NODES})")
    p.add_argument("--max-depth", type=int, default=6, help="deepest level considered (default 6)")
    p.add_argument("--top-k", type=int, default=8, help="widest rank considered (default 8)")
    p.add_argument("--draft-vocab", default="auto", help="as spec-compile --draft-vocab")
    p.add_argument("--out", type=Path, default=None, help="default: DRAFT_DIR/tree.json")
    p.add_argument("--accept-out", type=Path, default=None,
                   help=f"the acceptance table (default: DRAFT_DIR/{ACCEPT})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=32, help="prompts the target continues at once")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = add_verbose_flag(p).parse_args(argv)
    for flag in ("n", "max_new_tokens", "max_depth", "top_k", "batch"):
        if getattr(args, flag) <= 0:
            raise SpecCompileError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.nodes < 2:
        raise SpecCompileError(f"--nodes {args.nodes}: a tree needs the root and at least one node")
    if args.nodes > MAX_TREE_NODES:  # spec-compile would reject the tree (CompileConfig)
        raise SpecCompileError(f"--nodes {args.nodes}: the tree-attention kernels handle at most "
                               f"{MAX_TREE_NODES} nodes with the root; use --nodes {MAX_TREE_NODES} "
                               "or fewer")
    if not args.model_dir.is_dir():
        raise SpecCompileError(f"MODEL_DIR {args.model_dir}: no such directory")
    if not args.draft_dir.is_dir():
        raise SpecCompileError(f"DRAFT_DIR {args.draft_dir}: no such directory")
    for flag, path in (("--out", args.out), ("--accept-out", args.accept_out)):
        if path is not None and not path.parent.is_dir():  # checked before the long work
            raise SpecCompileError(f"{flag} {path}: its folder {path.parent} does not exist; "
                                   "create it or choose another path")
    t0 = time.time()
    dev = torch.device(args.device)
    target = load_target(args.model_dir).to(dev)
    draft = load_draft(args.draft_dir, target, draft_vocab=args.draft_vocab).to(dev)
    target.feature_layers = draft.cfg.fused_layers  # an EAGLE-3 head reads fused layers
    seqs = greedy_continuations(target, args.model_dir, args.prompts, args.n,
                                args.max_new_tokens, args.batch)
    paths = rank_paths(draft, seqs, args.max_depth, args.top_k)
    rates = prefix_rates(paths)
    tree = best_tree(rates, args.nodes, "fitted")
    if tree.n_nodes < args.nodes:
        print(f"note: only {tree.n_nodes - 1} distinct rank paths were seen; the tree has "
              f"{tree.n_nodes} nodes (more --n prompts or a larger --top-k give more)",
              file=sys.stderr)
    out = args.out or args.draft_dir / "tree.json"
    atomic_write_text(out, json.dumps([list(q) for q in tree.paths]) + "\n")
    print(f"wrote {out}: {tree.n_nodes} nodes, depth {tree.max_depth}, top-k {tree.top_k}",
          file=sys.stderr)
    accept_out = args.accept_out or args.draft_dir / ACCEPT
    keep = {q: rates[q] for q in ranked(rates)[:MAX_TREE_NODES - 1]}  # any tree an engine takes
    AcceptTable(keep, len(paths), _header(args, argv, time.time() - t0)).write(accept_out)
    print(f"wrote {accept_out}: the {len(keep)} most frequent rank paths over {len(paths)} start "
          "positions", file=sys.stderr)
    print("tree | nodes | expected tokens/call on these prompts")
    for t in (tree, resolve_tree("mc_sim_7b_63"), resolve_tree("chain-3"), resolve_tree("chain-5")):
        print(f"{t.name} | {t.n_nodes} | {expected_tpc(t, rates):.3f}")
    return 0


def _header(args, argv: list[str], seconds: float) -> dict:
    """What accept.json records about how it was made."""
    from ..hashing import record_path
    from .options import command_line

    return {"command": command_line("spec-fit-tree", argv),
            "settings": {"prompts": record_path(args.prompts), "n": args.n,
                         "max_new_tokens": args.max_new_tokens, "max_depth": args.max_depth,
                         "top_k": args.top_k, "draft_vocab": args.draft_vocab, "device": args.device},
            "prompts_sha256": sha256_file(args.prompts),
            "draft_sha256": draft_weights_sha256(args.draft_dir),
            "torch": torch.__version__, "seconds": round(seconds, 1)}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
