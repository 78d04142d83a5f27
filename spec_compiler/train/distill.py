"""The draft's training forward and the distillation loss.

EAGLE teacher forcing: over a sequence x with target features f (hidden after the final norm),
the draft input at rotary position i is the pair (x[i+1], f[i]); its output feature g[i] should
be the target's next feature f[i+1], and lm_head(g[i]) the target's next-token distribution
p[i+1] = softmax(lm_head(f[i+1])) (the target's logits are lm_head of its feature, so they are
recomputed here instead of stored).

    loss = w_feat * SmoothL1(g[i], f[i+1])  (mean over H)  +  w_kl * KL(p[i+1] || q[i])

averaged over the supervised positions: i from prompt_len - 1 (the first draft after prefill
predicts the second new token) up to the last position whose next token the target produced.
EAGLE (Li et al. 2024) uses the soft cross-entropy with weights 1.0 / 0.1; KL has the same
gradient and reads as "nats the draft is off" instead of including the target's entropy.

Feature noise (EAGLE): uniform noise of half-width `noise * rms(f)` on the input features,
so the draft tolerates its own (imperfect) features at deeper tree levels.

`draft_hidden` is EagleDraft.forward over a block from an empty cache (cache_len 0, capacity T,
causal), minus the lm_head over every position: the loss needs logits only where it is
supervised. tests/test_train.py checks it against EagleDraft.forward, block and incremental.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.eagle import EagleDraft
from ..models.llama import rope_cos_sin, run_layers
from .generate import Sequence


def draft_hidden(draft: EagleDraft, tokens, features):
    """tokens (B, T) = x[i+1], features (B, T, H) = f[i] -> draft features g (B, T, H)."""
    B, T = tokens.shape
    dev = tokens.device
    e = draft.embed_tokens(tokens)  # (B, T, H)
    x = draft.fc(torch.cat((e, features.to(e.dtype)), dim=-1))  # (B, T, H)
    cos, sin = rope_cos_sin(torch.arange(T, device=dev).expand(B, T), draft.inv_freq, x.dtype)
    kv = [torch.zeros(draft.cache_shape(B, T), dtype=x.dtype, device=dev)
          for _ in range(2 * draft.cfg.n_layers)]
    x, _ = run_layers(draft.layers, x, cos, sin, torch.zeros(B, dtype=torch.long, device=dev), kv)
    return x


@dataclass
class Batch:
    tokens: torch.Tensor    # (B, T) right-padded
    features: torch.Tensor  # (B, T, H)
    mask: torch.Tensor      # (B, T-1) bool: supervised draft positions i

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def supervised_range(s: Sequence) -> tuple[int, int]:
    """[lo, hi) of draft positions i with a real target next token x[i+2] or next feature."""
    last = len(s.tokens) - (3 if s.ended else 2)  # EOS-ended: the last target is the EOS itself
    return s.prompt_len - 1, last + 1


def collate(seqs: list[Sequence], device) -> Batch:
    T = max(len(s.tokens) for s in seqs)
    H = seqs[0].features.shape[1]
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    feats = torch.zeros(len(seqs), T, H)
    mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for b, s in enumerate(seqs):
        L = len(s.tokens)
        tokens[b, :L], feats[b, :L] = s.tokens, s.features
        lo, hi = supervised_range(s)
        mask[b, lo:hi] = True
    return Batch(tokens.to(device), feats.to(device), mask.to(device))


def distill_loss(draft: EagleDraft, batch: Batch, w_feat: float, w_kl: float, noise: float,
                 generator: torch.Generator | None = None):
    """-> (loss, metrics dict of floats). Only positions in batch.mask contribute."""
    f_in = batch.features[:, :-1]  # (B, T-1, H): f[i]
    if noise > 0:
        rms = batch.features[:, 1:][batch.mask].pow(2).mean().sqrt()  # scalar
        u = torch.rand(f_in.shape, generator=generator, device=f_in.device)
        f_in = f_in + (u * 2 - 1) * noise * rms
    g = draft_hidden(draft, batch.tokens[:, 1:], f_in)  # (B, T-1, H)
    g, f_next = g[batch.mask], batch.features[:, 1:][batch.mask]  # (N, H)
    feat = F.smooth_l1_loss(g, f_next, reduction="none").mean(-1).mean()
    with torch.no_grad():
        t_logp = torch.log_softmax(draft.lm_head(f_next).float(), -1)  # (N, V)
        t_arg = t_logp.argmax(-1)
    d_logp = torch.log_softmax(draft.lm_head(g).float(), -1)  # (N, V)
    kl = (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()
    loss = w_feat * feat + w_kl * kl
    acc = (d_logp.argmax(-1) == t_arg).float().mean()
    return loss, {"loss": loss.item(), "feat": feat.item(), "kl": kl.item(), "acc": acc.item()}


def lr_at(step: int, frac: float, base: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay over the run's progress `frac` in
    [0, 1] to min_ratio * base."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return base * w * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def minibatches(seqs: list[Sequence], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Length-sorted groups of `batch_size` (little padding), in a seeded random order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(groups), generator=generator).tolist()
    return [groups[p] for p in perm]
