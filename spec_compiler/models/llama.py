"""Llama as written: a block of new tokens attending to a static KV cache through causal SDPA.

Knows nothing of speculation, trees or compilation (gpt-fast style): the speculative step is
built from this module's exported graph by the FX passes in `passes/`.

Calling convention (flat tensors, so the exported graph has one placeholder per input):
    forward(tokens, input_pos, cache_len, k_0, v_0, ..., k_{L-1}, v_{L-1})
        tokens:    (B, T) int64     new tokens
        input_pos: (B, T) int64     rotary positions of the new tokens
        cache_len: (B,)   int64     valid cache entries; new tokens go to slots cache_len + [0, T)
        k_i, v_i:  (B, Hkv, S, Dh)  the static cache (S = capacity)
    -> logits (B, T, V) float32, hidden (B, T, H) (after the final norm; with `feature_layers`,
       the hidden states entering those layers, concatenated: an EAGLE-3 draft's features),
       k_0', v_0', ...
The cache update is functional (`scatter`); the static_kv_cache pass makes it in place.
Parameter names are Hugging Face's, so loading is a literal name map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with llama3 / linear scaling as transformers does."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, inv_l)


def rope_cos_sin(input_pos, inv_freq, dtype):
    """(B, T) positions -> cos, sin of shape (B, 1, T, Dh), computed in float32 like transformers."""
    freqs = input_pos[..., None].float() * inv_freq  # (B, T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def write_cache(cache, new, cache_len):
    """Functional cache update: new (B, Hkv, T, Dh) into slots cache_len + [0, T).  -> (B, Hkv, S, Dh)"""
    B, H, T, D = new.shape
    slots = cache_len[:, None] + torch.arange(T, device=new.device)  # (B, T)
    idx = slots[:, None, :, None].expand(B, H, T, D)
    return cache.scatter(2, idx, new)


def causal_slot_mask(cache_len, T: int, S: int):
    """(B, 1, T, S) bool: query t (slot cache_len + t) sees every slot <= its own."""
    q_slot = cache_len[:, None] + torch.arange(T, device=cache_len.device)  # (B, T)
    k_slot = torch.arange(S, device=cache_len.device)
    return (k_slot[None, None, :] <= q_slot[:, :, None])[:, None]


def cache_attention(q, k, v, k_cache, v_cache, cache_len):
    """A block of T new tokens attends causally over [cache | block]: the block's K/V are written
    to slots cache_len + [0, T) and every query sees each slot up to its own.
    q (B, Hq, T, Dh), k/v (B, Hkv, T, Dh), caches (B, Hkv, S, Dh) -> o (B, Hq, T, Dh), k', v'.
    The tree_attention pass rewrites exactly this (it traces this function as its pattern)."""
    k_all = write_cache(k_cache, k, cache_len)  # (B, Hkv, S, Dh)
    v_all = write_cache(v_cache, v, cache_len)
    mask = causal_slot_mask(cache_len, k.shape[2], k_cache.shape[2])
    o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o, k_all, v_all


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, in_features: int | None = None):
        """`in_features`: the q/k/v projections' input width (default the hidden size; an
        EAGLE-3 draft layer attends over [embedding ; feature], twice the hidden size)."""
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        i = in_features or h
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, d
        self.q_proj = nn.Linear(i, cfg.n_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(i, cfg.n_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(i, cfg.n_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * d, h, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, cache_len, k_cache, v_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, Dh)
        o, k_all, v_all = cache_attention(q, k, v, k_cache, v_cache, cache_len)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(o), k_all, v_all


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, input_norm: bool = True):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache_len, k_cache, v_cache):
        h = self.input_layernorm(x) if self.input_layernorm is not None else x
        a, k_all, v_all = self.self_attn(h, cos, sin, cache_len, k_cache, v_cache)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_all, v_all


def run_layers(layers, x, cos, sin, cache_len, kv):
    new_kv = []
    for i, layer in enumerate(layers):
        x, k_all, v_all = layer(x, cos, sin, cache_len, kv[2 * i], kv[2 * i + 1])
        new_kv += [k_all, v_all]
    return x, new_kv


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.feature_layers: tuple[int, ...] = ()

    def forward(self, tokens, input_pos, cache_len, *kv):
        normed, features, new_kv = self.forward_parts(tokens, input_pos, cache_len, kv)
        logits = self.lm_head(normed).float()  # (B, T, V)
        return (logits, features, *new_kv)

    def hidden_states(self, tokens, input_pos, cache_len, *kv):
        """`forward` without the lm_head: (features, *new_kv). Training's features."""
        _, features, new_kv = self.forward_parts(tokens, input_pos, cache_len, kv)
        return (features, *new_kv)

    def forward_parts(self, tokens, input_pos, cache_len, kv):
        """-> the final normed hidden state (B, T, H), the draft's features, the new caches.
        The features are that normed state (EAGLE-1/2), or with `feature_layers` set (an
        EAGLE-3 draft; the compiler sets it, the manifest records it) the hidden states
        entering those layers, concatenated in layer order (B, T, len * H)."""
        x = self.embed_tokens(tokens)  # (B, T, H)
        cos, sin = rope_cos_sin(input_pos, self.inv_freq, x.dtype)
        if not self.feature_layers:
            x, new_kv = run_layers(self.layers, x, cos, sin, cache_len, kv)
            x = self.norm(x)
            return x, x, new_kv  # the norm's output is the EAGLE feature
        fused, new_kv = [], []
        for i, layer in enumerate(self.layers):
            if i in self.feature_layers:
                fused.append(x)
            x, k_all, v_all = layer(x, cos, sin, cache_len, kv[2 * i], kv[2 * i + 1])
            new_kv += [k_all, v_all]
        return self.norm(x), torch.cat(fused, -1), new_kv

    def cache_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        return (batch, self.cfg.n_kv_heads, capacity, self.cfg.head_dim)
