"""The target continues its prompts itself, batched, and hands back its features on the way.

Uses our `Llama` module (the one the engine is compiled from), so the features the draft learns
from are exactly what the engine feeds it: the hidden state after the final norm. Ragged
batches need no padding mask: every row has its own `cache_len`, and the causal slot mask hides
whatever a shorter prompt's padding wrote past its end until a decode step overwrites it.

Throughput on a CPU is the whole game here (decode is weight-bandwidth bound), so:
- the cache capacity grows in steps of `grow` slots instead of being allocated at full length
  (Llama.forward's functional cache update copies the whole cache every step);
- finished rows (EOS) leave the batch at once, so later steps only pay for live rows;
- the prompt prefill runs in row chunks, bounding the (rows, P, vocab) logits it materialises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.llama import Llama


@dataclass
class Sequence:
    tokens: torch.Tensor    # (L,) int64: prompt + continuation
    features: torch.Tensor  # (L, H) float32: target hidden after the final norm, per position
    prompt_len: int
    ended: bool             # the continuation ends with EOS (whose feature is not computed: zeros)

    @property
    def n_new(self) -> int:
        return len(self.tokens) - self.prompt_len


def _pick(logits, temperature: float, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(target: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             grow: int = 32, prefill_rows: int = 16) -> list[Sequence]:
    """Continue every prompt until EOS or `max_new_tokens`; greedy when temperature <= 0."""
    dev = target.embed_tokens.weight.device
    B, H = len(prompts), target.cfg.hidden_size
    plen = torch.tensor([len(p) for p in prompts])
    p_max = int(plen.max())
    cap = p_max + grow
    toks = torch.zeros(B, p_max, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = torch.tensor(p)
    toks = toks.to(dev)

    # Prefill in row chunks. kv: (B, Hkv, cap, Dh) per layer and k/v.
    kv_parts, feats, last = [], [], []
    for r in range(0, B, prefill_rows):
        t = toks[r:r + prefill_rows]
        n = t.shape[0]
        kv = [torch.zeros(target.cache_shape(n, cap), device=dev, dtype=target.embed_tokens.weight.dtype)
              for _ in range(2 * target.cfg.n_layers)]
        pos = torch.arange(p_max, device=dev).expand(n, p_max)
        logits, hidden, *kv = target(t, pos, torch.zeros(n, dtype=torch.long, device=dev), *kv)
        kv_parts.append(kv)
        lp = plen[r:r + n].to(dev) - 1
        last.append(logits[torch.arange(n, device=dev), lp])  # (n, V)
        feats += [hidden[i, :plen[r + i]].float().cpu() for i in range(n)]
        del logits
    kv = [torch.cat([part[j] for part in kv_parts]) for j in range(len(kv_parts[0]))]
    logits = torch.cat(last)  # (B, V): the distribution of each row's first new token
    del kv_parts, last

    new_tok: list[list[int]] = [[] for _ in range(B)]
    new_feat: list[list[torch.Tensor]] = [[] for _ in range(B)]
    ended = [False] * B
    rows = torch.arange(B)                 # original index of each live row
    cache_len = plen.clone().to(dev)       # (live,)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, generator)  # (live,)
        is_eos = torch.isin(nxt, eos)
        for i, b in enumerate(rows.tolist()):
            new_tok[b].append(int(nxt[i]))
        done_eos = is_eos.cpu()
        for b in rows[done_eos].tolist():
            ended[b] = True
        keep = ~done_eos
        if not keep.all():  # EOS rows leave before the forward: their feature is never needed
            rows, nxt, cache_len = rows[keep], nxt[keep.to(dev)], cache_len[keep.to(dev)]
            kv = [c[keep.to(dev)] for c in kv]
        if rows.numel() == 0:
            break
        if int(cache_len.max()) + 1 > cap:
            pad = torch.zeros(*kv[0].shape[:2], grow, kv[0].shape[3], dtype=kv[0].dtype, device=dev)
            kv = [torch.cat((c, pad[:c.shape[0]]), 2) for c in kv]
            cap += grow
        # Feed the new token: its feature f[pos] and the next distribution. (live, 1)
        logits, hidden, *kv = target(nxt[:, None], cache_len[:, None], cache_len, *kv)
        logits = logits[:, 0]
        h = hidden[:, 0].float().cpu()
        for i, b in enumerate(rows.tolist()):
            new_feat[b].append(h[i])
        cache_len = cache_len + 1

    out = []
    for b in range(B):
        fe = [feats[b]] + ([torch.stack(new_feat[b])] if new_feat[b] else [])
        if ended[b]:
            fe.append(torch.zeros(1, H))
        tokens = torch.cat((toks[b, :plen[b]].cpu(), torch.tensor(new_tok[b], dtype=torch.long)))
        out.append(Sequence(tokens, torch.cat(fe), int(plen[b]), ended[b]))
        assert out[-1].features.shape[0] == len(tokens), (out[-1].features.shape, len(tokens))
    return out
