"""Training an EAGLE-3 head: training-time test (TTT) and a token-level loss.

The head reads the target's fused layers (features f, 3 x hidden) only at its first step; every
later draft step reads its own output g. Trained only teacher-forced on f, it never sees g, so
EAGLE-3 unrolls the draft during training ("training-time test"): over a sequence x with
target features f, step 1 is the teacher-forced pass (pair (x[i+1], f[i]) at rotary position
i -> g1[i]); step k > 1 feeds, at row i, the pair (x[i+k], g_{k-1}[i]) at position i + k - 1,
which attends to step 1's keys at rows <= i (what the engine's catch-up cache holds) and to
steps 2..k's keys at row i itself (the drafted ancestors on the path from root i), exactly what
the engine's level k-1 forward sees once the draft's earlier tokens were accepted.
`ttt_hidden` computes all steps for all rows at once (the diagonal keys are a per-row dot
product); tests/test_train_eagle3.py checks every step against incremental `Eagle3Draft` calls
through a KV cache.

Loss (token level, no feature regression: the features are fused layers the head does not
predict): step k at row i is scored against the target's next-token distribution at position
i + k, p[i+k] = softmax(target lm_head(final[i+k])), by KL(p || q_k), averaged over the
supervised rows and summed over steps with weights decay^(k-1) (normalised), decay 0.8 as
EAGLE-3's reference. `final` (the target's normed last hidden state) is stored beside f
(features of width 4 x hidden: [f ; final]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.eagle3 import Eagle3Draft
from ..models.llama import apply_rope, rope_cos_sin

TTT_DECAY = 0.8


def ttt_hidden(draft: Eagle3Draft, tokens: torch.Tensor, fused: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """tokens (B, T) = x[i+1], fused (B, T, F) = f[i] -> [g_1, ..., g_steps], each (B, T, H):
    step k's output at row i (its token input x[i+k]; rows past the end get token 0, and no
    loss reads them)."""
    B, T = tokens.shape
    layer, attn = draft.midlayer, draft.midlayer.self_attn
    nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    rep, scale = nh // nkv, 1.0 / math.sqrt(hd)
    dev = tokens.device
    x = draft.fc(fused.to(draft.fc.weight.dtype))
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    keys, values, outs = [], [], []
    for k in range(1, steps + 1):
        tok = F.pad(tokens[:, k - 1:], (0, k - 1))  # row i: x[i+k]
        e = draft.embed_tokens(tok)
        h = torch.cat((layer.input_layernorm(e), layer.hidden_norm(x)), dim=-1)
        q = attn.q_proj(h).view(B, T, nh, hd).transpose(1, 2)
        kk = attn.k_proj(h).view(B, T, nkv, hd).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, nkv, hd).transpose(1, 2)
        pos = (torch.arange(T, device=dev) + (k - 1)).expand(B, T)
        cos, sin = rope_cos_sin(pos, draft.inv_freq, q.dtype)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        keys.append(kk.repeat_interleave(rep, 1))
        values.append(v.repeat_interleave(rep, 1))
        s = [(q @ keys[0].transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]  # (B,nh,T,T)
        s += [(q * km).sum(-1, keepdim=True) * scale for km in keys[1:]]  # the path's own keys
        p = torch.cat(s, -1).float().softmax(-1).to(q.dtype)
        o = p[..., :T] @ values[0]
        for m, vm in enumerate(values[1:]):
            o = o + p[..., T + m:T + m + 1] * vm
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, nh * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        outs.append(x)
    return outs


def ttt_loss(draft: Eagle3Draft, target_head: torch.nn.Linear, tokens: torch.Tensor, features: torch.Tensor,
             mask: torch.Tensor, steps: int, hot: torch.Tensor | None = None):
    """tokens (B, T), features (B, T, F + H) = [fused ; final], mask (B, T-1): supervised draft
    rows (as distill.collate marks them). -> (loss, metrics: loss, kl and acc of step 1 and of
    the last step).

    With `hot` (the head's lm_head scores only those target ids, column j = hot[j]) the target's
    distribution is taken over the hot ids and renormalised, and rows whose target top token is
    not hot are not scored (the head cannot propose it), as EAGLE-3's reference trains; `acc`
    still compares target ids over every scored row position (a row whose top token is not hot
    counts as a miss)."""
    F_ = draft.fc.in_features
    fused, final = features[:, :-1, :F_], features[..., F_:]
    outs = ttt_hidden(draft, tokens[:, 1:], fused, steps)
    T1 = mask.shape[1]
    total, wsum, metrics = 0.0, 0.0, {}
    for k, g in enumerate(outs, start=1):
        # row i is scored at step k if it is supervised and position i + k has a target token
        ok = mask & F.pad(mask[:, k - 1:], (0, k - 1))
        if not bool(ok.any()):
            break
        nxt = F.pad(final[:, k:], (0, 0, 0, k - 1))[:, :T1]  # (B, T-1, H): final[i+k]
        with torch.no_grad():
            t_logits = target_head(nxt[ok]).float()
            t_top = t_logits.argmax(-1)  # target ids
            if hot is not None:
                is_hot = torch.zeros(t_logits.shape[-1], dtype=torch.bool, device=t_logits.device)
                is_hot[hot] = True
                scored = is_hot[t_top]
                t_logits = t_logits[:, hot]
            t_logp = torch.log_softmax(t_logits, -1)
        d_logp = torch.log_softmax(draft.lm_head(draft.norm(g[ok])).float(), -1)
        d_top = d_logp.argmax(-1) if hot is None else hot[d_logp.argmax(-1)]
        acc = (d_top == t_top).float().mean().item()
        kl_rows = (t_logp.exp() * (t_logp - d_logp)).sum(-1)
        if hot is None:
            kl = kl_rows.mean()
        else:  # (no row scored: 0, still a tensor of the graph)
            kl = (kl_rows * scored).sum() / scored.sum().clamp(min=1)
        w = TTT_DECAY ** (k - 1)
        total, wsum = total + w * kl, wsum + w
        if k == 1:
            metrics.update(kl=kl.item(), acc=acc)
        metrics.update(kl_last=kl.item(), acc_last=acc)
    loss = total / wsum
    metrics["loss"] = loss.item()
    return loss, metrics
