"""EAGLE-3 draft head as written: one forward over a block of (token, feature) pairs.

    x = fc(feature[i])  if the feature is the target's (three layers, 3 x target hidden)
      = feature[i]      if it is the draft's own output (hidden), fed back while drafting
    a = attention(concat(input_layernorm(embed(token[i+1])), hidden_norm(x)))  at rotary position i
    x = x + a;  x = x + mlp(post_attention_layernorm(x))       (the one decoder layer, "midlayer")
    logits = lm_head(norm(x))   (the head's own lm_head over its draft vocabulary)

Which branch the first line takes is the feature's width, a static shape: the catch-up forward
over accepted tokens reads the target's fused features, tree levels read the draft's own. The
output feature is x before the final norm, as the reference feeds it back.

Calling convention as `EagleDraft` (models/eagle.py):
    forward(tokens, features, input_pos, cache_len, k_0, v_0)
    -> logits (B, T, Vd) float32, out_features (B, T, H), k_0', v_0'
With a reduced vocabulary logit column j scores target token `hot_ids[j]` (= j + d2t[j]).
Parameter names are the reference checkpoint's (`fc`, `midlayer.*`, `norm`, `lm_head`), so
loading is a literal name map.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Eagle3Config, ModelConfig
from .llama import MLP, Attention, RMSNorm, rope_cos_sin, rope_inv_freq


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = Attention(cfg, in_features=2 * h)
        self.mlp = MLP(cfg)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, emb, x, cos, sin, cache_len, k_cache, v_cache):
        h = torch.cat((self.input_layernorm(emb), self.hidden_norm(x)), dim=-1)
        a, k_all, v_all = self.self_attn(h, cos, sin, cache_len, k_cache, v_cache)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_all, v_all


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config, target: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.layer
        h = c.hidden_size
        self.embed_tokens = nn.Embedding(target.vocab_size, h)  # the target's unless the head ships one
        self.fc = nn.Linear(len(cfg.aux_layers) * cfg.target_hidden_size, h, bias=False)
        self.midlayer = Eagle3Layer(c)
        self.norm = RMSNorm(h, c.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size or target.vocab_size, bias=False)
        hot = None if cfg.draft_vocab_size is None else torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
        self.register_buffer("hot_ids", hot)  # (Vd,) int64 target ids of the logit columns, or None
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)

    def forward(self, tokens, features, input_pos, cache_len, *kv):
        k_cache, v_cache = kv  # varargs, as every model here: the exporter's calling convention
        e = self.embed_tokens(tokens)  # (B, T, H)
        x = features.to(e.dtype)
        if x.shape[-1] != e.shape[-1]:  # the target's fused layers (static: the graph's input shape)
            x = self.fc(x)
        cos, sin = rope_cos_sin(input_pos, self.inv_freq, x.dtype)
        x, k_all, v_all = self.midlayer(e, x, cos, sin, cache_len, k_cache, v_cache)
        logits = self.lm_head(self.norm(x)).float()  # (B, T, Vd)
        return logits, x, k_all, v_all

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Logit column indices (e.g. a top-k's) -> target token ids (identity when full)."""
        return columns if self.hot_ids is None else self.hot_ids[columns]

    def cache_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        c = self.cfg.layer
        return (batch, c.n_kv_heads, capacity, c.head_dim)
