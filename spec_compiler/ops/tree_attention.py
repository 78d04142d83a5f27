"""`spec::tree_attention`: two-pass attention of a block of tree queries over [cache | tree].

    out = merge(prefix(q, K_cache[:cache_len], V_cache[:cache_len]),      # no per-key mask
                suffix(q, K_new, V_new, tree_mask))                        # static (T, T) mask
    merge by log-sum-exp (natural log):  lse = logaddexp(lse_p, lse_s)
                                         out = exp(lse_p - lse) * o_p + exp(lse_s - lse) * o_s

The op is a `torch.library.triton_op`: export keeps it as one node (so passes can see it) and
Inductor/AOTInductor trace into its body, so the engine carries the kernels, not a Python callback.
On CUDA the body launches the Triton kernels (`spec_compiler.kernels`); elsewhere it is the
plain-torch two-pass reference below, which Inductor compiles like any other torch code.

Shapes: q (B, Hq, T, Dh); k_cache, v_cache (B, Hkv, S, Dh); k_new, v_new (B, Hkv, Tk, Dh) (Tk = T,
or more for a draft level that also sees earlier levels' keys); cache_len (B,) int64 (prefix =
slots [0, cache_len)); tree_mask (T, Tk) bool. -> (B, Hq, T, Dh). The CUDA kernels take T and Tk
up to `spec_compiler.kernels.limits` (MAX_QUERIES, MAX_SUFFIX_KEYS); the reference has no limit.
"""

from __future__ import annotations

import math

import torch
from torch.library import triton_op

NEG_INF = float("-inf")


def attend_reference(q, k, v, mask, scale):
    """One attention pass returning (out, lse). mask (B or 1, 1, T or 1, N) bool, True = visible.

    Rows with no visible key give out = 0 and lse = -inf, so they merge with zero weight.
    Accumulates in float32 (float64 for float64 inputs).  q (B, Hq, T, Dh), k/v (B, Hkv, N, Dh).
    Grouped-query attention without copying K/V per query head: query head h reads kv head
    h // g, so the g query heads of a kv head are stacked as g*T rows against that head's keys
    (a repeat_interleave of the cache would write g copies of it on every call).
    """
    B, Hq, T, Dh = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    qg = q.reshape(B, Hkv, g * T, Dh).to(acc)  # rows (j, t) of kv head: query head kv * g + j
    if g > 1 and mask.shape[2] > 1:  # a per-query mask repeats per query head of the group
        mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * T, N)
    s = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (B, Hkv, g*T, N)
    s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, g*T)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p, v.to(acc)).reshape(B, Hq, T, Dh), lse.reshape(B, Hq, T)


def merge_reference(o_a, lse_a, o_b, lse_b):
    """Merge two partial attentions by log-sum-exp; -inf partials get zero weight (never NaN)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    return o_a * w_a + o_b * w_b, lse


def tree_attention_reference(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale):
    """Plain-torch two-pass tree attention: prefix over the cache, suffix over the tree, merged."""
    S = k_cache.shape[2]
    in_prefix = torch.arange(S, device=q.device)[None, :] < cache_len[:, None]  # (B, S)
    o_p, lse_p = attend_reference(q, k_cache, v_cache, in_prefix[:, None, None, :], scale)
    o_s, lse_s = attend_reference(q, k_new, v_new, tree_mask[None, None], scale)
    out, _ = merge_reference(o_p, lse_p, o_s, lse_s)
    return out.to(q.dtype)


@triton_op("spec::tree_attention", mutates_args=())
def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   k_new: torch.Tensor, v_new: torch.Tensor, cache_len: torch.Tensor,
                   tree_mask: torch.Tensor, scale: float) -> torch.Tensor:
    if q.is_cuda:
        from ..kernels.tree_attention import tree_attention_triton

        return tree_attention_triton(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale)
    return tree_attention_filled(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale)


@tree_attention.register_fake
def _(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale):
    """The output's shape without running the body: export keeps the op as one node, and the
    CPU body's run-time prefix length (tree_attention_filled) is created only where Inductor
    traces into the body (an op's fake implementation may not create unbacked sizes)."""
    return q.new_empty(q.shape)


def tree_attention_filled(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale):
    """The reference over the filled part of the caches only, slots [0, max(cache_len, 1)): the
    same result (the prefix mask hides every slot past a row's cache_len), but the work and the
    cache bytes read follow the context, not the capacity. The length is read from the data, so
    compiled code sizes the prefix at run time (an unbacked size; at least one slot, masked when
    the cache is empty, so no reduction is over nothing)."""
    n = cache_len.max().clamp(min=1).item()
    torch._check(n >= 1)
    torch._check(n <= k_cache.shape[2])
    return tree_attention_reference(q, k_cache[:, :, :n], v_cache[:, :, :n], k_new, v_new, cache_len,
                                    tree_mask, scale)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
