"""Offline draft-quality proxies on the target's own greedy continuations.

- top-1 accuracy: the draft's first guess after each position (teacher-forced on the target's
  true features) equals the target's next token;
- chain acceptance: from every start position the draft runs k steps on its own (its own
  tokens and features, through its KV cache, exactly as the engine's chain-k drafts), and the
  accepted length is the number of leading drafted tokens equal to the target's greedy tokens.
  Tokens per verify call for chain-k ~= 1 + mean accepted length (averaged over all starts, not
  only those a real decode visits, hence a proxy).

    python -m spec_compiler.train.evaluate MODEL_DIR DRAFT_DIR [--prompts FILE] [--n 40]
        [--max-new-tokens 192] [--depth 5] [--cache FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import SpecCompileError, add_verbose_flag, cli_entry
from ..models.eagle import EagleDraft
from ..models.eagle3 import Eagle3Draft
from .generate import Sequence


@torch.no_grad()
def chain_acceptance(draft: EagleDraft | Eagle3Draft, seqs: list[Sequence], depth: int = 5) -> dict:
    """-> {"top1": float, "chain": [mean accepted tokens for chain-1..depth], "n_starts": int}"""
    dev = draft.fc.weight.device
    accepted, top1 = [], []
    for s in seqs:
        x, f, P, L = s.tokens.to(dev), s.features.to(dev), s.prompt_len, len(s.tokens)
        starts = torch.arange(P - 1, L - 1 - depth, device=dev)  # x[i + 1 + depth] exists
        if starts.numel() == 0:
            continue
        T = L - 1
        kv = [torch.zeros(draft.cache_shape(1, T + depth), device=dev, dtype=draft.fc.weight.dtype)
              for _ in range(2 * draft.cfg.n_layers)]
        logits, g, *kv = draft(x[None, 1:], f[None, :-1], torch.arange(T, device=dev)[None],
                               torch.zeros(1, dtype=torch.long, device=dev), *kv)
        tf_logits = logits  # teacher-forced: the draft's first guess after every position
        M = starts.numel()
        y = draft.token_ids(logits[0, starts].argmax(-1))  # (M,) depth-1 drafts (target ids)
        g = g[0, starts][:, None]         # (M, 1, H)
        kv = [c.expand(M, -1, -1, -1) for c in kv]
        match = [y == x[starts + 2]]
        for d in range(1, depth):
            pos = starts + d  # the pair (y_d, g_d) sits one position further
            logits, g, *kv = draft(y[:, None], g, pos[:, None], pos, *kv)
            y = draft.token_ids(logits[:, 0].argmax(-1))
            match.append(y == x[starts + 2 + d])
        m = torch.stack(match, 1).int()       # (M, depth)
        accepted.append(m.cumprod(1).cpu())   # leading matches
        # top-1 over every supervised position (also those too close to the end for a chain)
        hi = L - (3 if s.ended else 2) + 1
        i = torch.arange(P - 1, min(hi, L - 2), device=dev)
        top1.append((draft.token_ids(tf_logits[0, i].argmax(-1)) == x[i + 2]).cpu())
    if not accepted:
        raise SpecCompileError("evaluation: no continuation is long enough to score")
    a = torch.cat(accepted).float()  # (N, depth)
    chain = [float(a[:, :k].sum(1).mean()) for k in range(1, depth + 1)]
    return {"top1": float(torch.cat(top1).float().mean()), "chain_accepted": chain,
            "chain_tokens_per_call": [1 + c for c in chain], "n_starts": int(a.shape[0])}


def _seqs_to_state(seqs: list[Sequence]) -> dict:
    return {"tokens": [s.tokens for s in seqs], "features": [s.features for s in seqs],
            "prompt_len": [s.prompt_len for s in seqs], "ended": [s.ended for s in seqs]}


@cli_entry()
def main(argv: list[str] | None = None) -> int:
    from ..loading import load_draft, load_target
    from .data import DEFAULT_DEV_PROMPTS
    from .generate import greedy_continuations

    p = argparse.ArgumentParser(prog="python -m spec_compiler.train.evaluate")
    p.add_argument("model_dir", type=Path)
    p.add_argument("draft_dirs", type=Path, nargs="+")
    p.add_argument("--prompts", type=Path, default=DEFAULT_DEV_PROMPTS)
    p.add_argument("--n", type=int, default=40, help="first N prompts of the file")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--batch", type=int, default=40, help="prompts generated at once")
    p.add_argument("--cache", type=Path, default=None,
                   help="store/reuse the generated continuations here (torch file)")
    p.add_argument("--threads", type=int, default=None)
    args = add_verbose_flag(p).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.model_dir)
    drafts = [load_draft(d, target) for d in args.draft_dirs]
    # The features the drafts read: the last hidden state, or an EAGLE-3 head's fused layers.
    fused = {d.cfg.fused_layers for d in drafts}
    if len(fused) > 1:
        raise SpecCompileError("these drafts read different target features (EAGLE-1/2 and EAGLE-3, or "
                               "EAGLE-3 heads on different layers); score them in separate runs")
    target.feature_layers = fused.pop()
    width = target.cfg.hidden_size * max(1, len(target.feature_layers))
    if args.cache and args.cache.is_file():
        c = torch.load(args.cache, weights_only=True)
        seqs = [Sequence(t, f, pl, e) for t, f, pl, e in
                zip(c["tokens"], c["features"], c["prompt_len"], c["ended"])]
        if seqs and seqs[0].features.shape[1] != width:
            raise SpecCompileError(f"--cache {args.cache}: its features are {seqs[0].features.shape[1]} wide, "
                                   f"these drafts read {width}; use another --cache file")
    else:
        t0 = time.time()
        seqs = greedy_continuations(target, args.model_dir, args.prompts, args.n,
                                    args.max_new_tokens, args.batch)
        print(f"generated {sum(s.n_new for s in seqs)} tokens in {time.time() - t0:.0f}s",
              file=sys.stderr)
        if args.cache:
            torch.save(_seqs_to_state(seqs), args.cache)
    for d, draft in zip(args.draft_dirs, drafts):
        res = chain_acceptance(draft, seqs, args.depth)
        print(json.dumps({"draft": str(d), **res}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
