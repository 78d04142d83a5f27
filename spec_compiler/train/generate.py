"""The target continues its prompts itself, batched; then one teacher-forced pass gives its features.

Uses our `Llama` module (the one the engine is compiled from), so the features the draft learns
from are exactly what the engine feeds it: the hidden state after the final norm.

Two phases, because they have opposite costs:
- decode (`continue_prompts`): one token per row per step. Ragged batches need no padding mask:
  every row has its own `cache_len`, and the causal slot mask hides whatever a shorter prompt's
  padding wrote past its end until a decode step overwrites it. The loop never waits on the
  device inside a step: tokens are picked on the device (greedy, or Gumbel-max sampling from a
  device generator), written into a (rows, max_new) buffer, and EOS only clears an `alive`
  flag. Every `sync_every` steps the host reads the flags once and drops finished rows, so later
  steps only pay for live rows. The cache capacity grows in steps of `grow` slots (the
  functional cache update copies the whole cache every step).
- features (`featurize`): the finished sequences, right-padded, through one causal forward in
  row chunks. The same numbers a token-by-token decode produces (up to float rounding), at
  matrix-multiply speed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.llama import Llama


@dataclass
class Sequence:
    tokens: torch.Tensor    # (L,) int64: prompt + continuation
    features: torch.Tensor | None  # (L, H) float32: target hidden after the final norm, per position
    prompt_len: int
    ended: bool             # the continuation ends with EOS (whose feature is never used: zeros)
    prompt_index: int = -1  # the prompt's row in its prompt file, where known (a corpus records it)

    @property
    def n_new(self) -> int:
        return len(self.tokens) - self.prompt_len


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """(rows, V) -> (rows,) next tokens, on the device: argmax, or Gumbel-max at `temperature`."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(min=1e-20)
    return (logits.float() / temperature - torch.log(-torch.log(u))).argmax(-1)


def _new_cache(target: Llama, rows: int, cap: int, dev) -> list[torch.Tensor]:
    dt = target.embed_tokens.weight.dtype
    return [torch.zeros(target.cache_shape(rows, cap), device=dev, dtype=dt)
            for _ in range(2 * target.cfg.n_layers)]


@torch.no_grad()
def continue_prompts(target: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids,
                     temperature: float = 0.0, generator: torch.Generator | None = None,
                     grow: int = 32, prefill_rows: int = 16,
                     sync_every: int = 8) -> list[Sequence]:
    """Continue every prompt until EOS or `max_new_tokens`; greedy when temperature <= 0.

    `generator` must live on the target's device when sampling. Returns sequences without
    features (see `featurize`)."""
    dev = target.embed_tokens.weight.device
    B = len(prompts)
    plen = torch.tensor([len(p) for p in prompts])
    p_max = int(plen.max())
    cap = p_max + grow
    toks = torch.zeros(B, p_max, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = torch.tensor(p)
    toks = toks.to(dev)

    # Prefill in row chunks (bounds the (rows, P, V) logits). kv: (B, Hkv, cap, Dh) per layer/k/v.
    kv_parts, last = [], []
    for r in range(0, B, prefill_rows):
        t = toks[r:r + prefill_rows]
        n = t.shape[0]
        pos = torch.arange(p_max, device=dev).expand(n, p_max)
        logits, _, *kv = target(t, pos, torch.zeros(n, dtype=torch.long, device=dev),
                                *_new_cache(target, n, cap, dev))
        kv_parts.append(kv)
        last.append(logits[torch.arange(n, device=dev), plen[r:r + n].to(dev) - 1])  # (n, V)
        del logits
    kv = [torch.cat([part[j] for part in kv_parts]) for j in range(len(kv_parts[0]))]
    logits = torch.cat(last)  # (B, V): each row's first new token's distribution
    del kv_parts, last

    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)     # original index of each live row
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    cache_len = plen.to(dev)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
    n_live, max_len = B, p_max             # host-side bounds, no sync needed
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, generator)  # (live,)
        out[rows, step] = nxt
        alive &= ~torch.isin(nxt, eos)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % sync_every == 0:  # the one host read: drop rows that have finished
            keep = alive.nonzero()[:, 0]
            if keep.numel() == 0:
                break
            if keep.numel() < n_live:
                rows, alive, nxt, cache_len = rows[keep], alive[keep], nxt[keep], cache_len[keep]
                kv = [c[keep] for c in kv]
                n_live = keep.numel()
        if max_len + 1 > cap:
            pad = torch.zeros(*kv[0].shape[:2], grow, kv[0].shape[3], dtype=kv[0].dtype, device=dev)
            kv = [torch.cat((c, pad), 2) for c in kv]
            cap += grow
        logits, _, *kv = target(nxt[:, None], cache_len[:, None], cache_len, *kv)
        logits = logits[:, 0]
        cache_len = cache_len + 1
        max_len += 1

    out = out.cpu()
    seqs = []
    for b in range(B):
        new = out[b]
        hit = torch.isin(new, eos.cpu()).nonzero()
        ended = hit.numel() > 0
        if ended:
            new = new[:int(hit[0, 0]) + 1]
        seqs.append(Sequence(torch.cat((toks[b, :plen[b]].cpu(), new)), None, int(plen[b]), ended))
    return seqs


@torch.no_grad()
def featurize(target: Llama, seqs: list[Sequence], rows: int = 16,
              max_tokens: int = 16384, with_final: bool = False) -> list[Sequence]:
    """Fill each sequence's features with one causal forward (length-sorted chunks of at most
    `rows` sequences and about `max_tokens` padded tokens): the target's features (its last
    normed hidden state, or with `feature_layers` set the fused layers), followed with
    `with_final` by its last normed hidden state (an EAGLE-3 loss reads the target's next-token
    distribution from it). An EOS's own row stays zero: the engine never feeds an EOS back, and
    no loss reads it."""
    dev = target.embed_tokens.weight.device
    H = target.cfg.hidden_size * (max(1, len(target.feature_layers)) + with_final)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    i = 0
    while i < len(order):
        L = len(seqs[order[i]].tokens)
        n = 1
        while (i + n < len(order) and n < rows
               and (n + 1) * len(seqs[order[i + n]].tokens) <= max(max_tokens, L)):
            n += 1
        chunk = [seqs[j] for j in order[i:i + n]]
        T = max(len(s.tokens) for s in chunk)
        t = torch.zeros(n, T, dtype=torch.long)
        for r, s in enumerate(chunk):
            t[r, :len(s.tokens)] = s.tokens
        pos = torch.arange(T, device=dev).expand(n, T)
        final, hidden, _ = target.forward_parts(t.to(dev), pos, torch.zeros(n, dtype=torch.long, device=dev),
                                                _new_cache(target, n, T, dev))
        hidden = (torch.cat((hidden, final), -1) if with_final else hidden).float().cpu()
        for r, s in enumerate(chunk):
            f = hidden[r, :len(s.tokens)].clone()
            if s.ended:
                f[-1] = 0
            s.features = f
        i += n
    assert all(s.features is not None and s.features.shape == (len(s.tokens), H) for s in seqs)
    return seqs


def greedy_continuations(target: Llama, model_dir: Path, prompts: Path, n: int, max_new_tokens: int,
                         batch: int, max_prompt_tokens: int = 1024) -> list[Sequence]:
    """The first `n` prompts of a prompt file (chat template), continued greedily with features,
    `batch` at a time, with a progress line per batch: what evaluation and tree fitting score."""
    from .data import encode_prompts, load_tokenizer, read_prompts

    ids = encode_prompts(read_prompts(prompts)[:n], load_tokenizer(model_dir),
                         target.cfg.vocab_size, prompts, max_prompt_tokens)
    t0, seqs = time.time(), []
    for r in range(0, len(ids), batch):
        seqs += generate(target, ids[r:r + batch], max_new_tokens, target.cfg.eos_token_ids)
        print(f"continued {min(r + batch, len(ids))}/{len(ids)} prompts ({time.time() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    return seqs


def generate(target: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             **kw) -> list[Sequence]:
    """`continue_prompts` then `featurize`: continuations with the target's features."""
    return featurize(target, continue_prompts(target, prompts, max_new_tokens, eos_ids,
                                              temperature, generator, **kw))
