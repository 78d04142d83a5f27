"""EAGLE-1/2 draft head as written: one forward over a block of (token, feature) pairs.

    x = fc(concat(embed(token[i+1]), feature[i]))   at rotary position i
    x = layers(x)        (layer 0 has no input norm; N >= 1 dense layers)
    logits = lm_head(x)  (the target's lm_head, or its rows of the hot tokens; no final norm)

Calling convention (flat tensors, like `Llama.forward`):
    forward(tokens, features, input_pos, cache_len, k_0, v_0, ...)
        tokens (B, T) int64, features (B, T, H), input_pos (B, T), cache_len (B,), caches (B, Hkv, S, Dh)
    -> logits (B, T, Vd) float32, out_features (B, T, H), k_0', v_0', ...
Vd is the target's vocabulary V, or with a reduced ("hot-token") draft vocabulary
(cfg.draft_vocab_size, EAGLE-3 / FR-Spec) the number of hot tokens: logit column j then scores
target token `hot_ids[j]`, and `token_ids` maps columns to target ids. Input tokens are always
target ids (the embedding is the target's). The draft only proposes, so a reduced vocabulary
never changes the output, only how often the target's choice is among the proposals.
Tree expansion and catch-up are built from this graph by the unroll_draft pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DraftConfig, ModelConfig
from .llama import DecoderLayer, rope_cos_sin, rope_inv_freq, run_layers


class EagleDraft(nn.Module):
    def __init__(self, cfg: DraftConfig, target: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.layer.hidden_size
        # Shared with the target unless the head ships its own (loading ties them). With a hot
        # vocabulary the lm_head is (Vd, H): its own tensor, the hot rows of the target's.
        self.embed_tokens = nn.Embedding(target.vocab_size, h)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size or target.vocab_size, bias=False)
        hot = None if cfg.draft_vocab_size is None else torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
        self.register_buffer("hot_ids", hot)  # (Vd,) int64 target ids of the logit columns, or None
        self.fc = nn.Linear(2 * h, h, bias=cfg.fc_bias)
        self.layers = nn.ModuleList(DecoderLayer(cfg.layer, input_norm=i > 0)
                                    for i in range(cfg.n_layers))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.layer), persistent=False)

    def forward(self, tokens, features, input_pos, cache_len, *kv):
        e = self.embed_tokens(tokens)  # (B, T, H)
        x = self.fc(torch.cat((e, features.to(e.dtype)), dim=-1))  # (B, T, H)
        cos, sin = rope_cos_sin(input_pos, self.inv_freq, x.dtype)
        x, new_kv = run_layers(self.layers, x, cos, sin, cache_len, kv)
        logits = self.lm_head(x).float()  # (B, T, Vd)
        return (logits, x, *new_kv)

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Logit column indices (e.g. a top-k's) -> target token ids (identity when full)."""
        return columns if self.hot_ids is None else self.hot_ids[columns]

    def cache_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        c = self.cfg.layer
        return (batch, c.n_kv_heads, capacity, c.head_dim)
