"""Sampling at temperature > 0: the target distribution, counter-based randomness and lossless
multi-round speculative sampling over a static tree, as plain torch functions of fixed-shape
tensors (no host sync, no generator state), so the accept epilogue traces them into the verify
graph and a CUDA graph replays them.

Target distribution (transformers' `generate` order): softmax(logits / T), restricted to the
top-k logits (ties at the k-th value kept), then to the smallest set of most probable tokens
whose probability reaches top-p (the most probable token always kept), renormalised.
`top_k = 0` and `top_p = 1` mean no restriction.

Randomness: every draw is `uniform(seed, position, node, purpose)`, a hash (splitmix64 rounds)
of the sequence's seed, the token position, the tree node and what the draw is for. A
sequence's tokens therefore depend on nothing else in the batch, are the same on every
tensor-parallel rank, and are the same inside a replayed CUDA graph.

Verification (the paper's multi-round speculative sampling, with the draft's top-k candidates as
deterministic proposals): at node n with warped target distribution p_n, try its children in
draft-rank order; child c is accepted with probability r(c) under the residual r (initially
p_n); on rejection r(c) := 0 and r is renormalised; once a child is accepted, continue at it;
when every child is rejected, or at a leaf, the bonus token is drawn from r. Why it is lossless:
a proposal x with draft probability q(x) = 1 is accepted with probability min(1, r(x) / q(x)) =
r(x), and a rejection leaves exactly the residual max(0, r - q) / (1 - r(x)) = r with x removed;
so each round emits x with probability r(x) and otherwise continues with r conditioned on "not
x": by induction the token emitted at a node (accepted child or bonus) is distributed as p_n.
The children are distinct tokens (a top-k), so r(c_j) = p(c_j) / (1 - sum_{i<j} p(c_i)).
"""

from __future__ import annotations

import torch

ACCEPT, BONUS = 0, 1  # what a draw is for: accepting a drafted node, or drawing a bonus token

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in wrapping int64 arithmetic."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniform(seed: torch.Tensor, position: torch.Tensor, node: torch.Tensor | int,
            purpose: int) -> torch.Tensor:
    """Uniform draws in [0, 1) (float64, 53 random bits), one per element of the broadcast of
    the int64 arguments: a pure function of (seed, position, node, purpose)."""
    h = _mix(seed.long())
    h = _mix(h ^ position.long())
    h = _mix(h ^ (torch.as_tensor(node, dtype=torch.long, device=h.device) * 2 + purpose))
    return _shr(h, 11).double() * (1.0 / (1 << 53))


SCAN_BLOCK = 4096


def cumsum(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(-1) as a two-level blocked scan when the last dimension is longer than
    SCAN_BLOCK: a scan inside blocks of SCAN_BLOCK, then an exclusive scan of the block totals
    added back. The same sums in another association order (a scan kernel picks its own order
    too): for x >= 0 it is non-decreasing up to one rounding of the running sum at block
    boundaries, which moves an inverse-CDF draw only when u falls inside that rounding. Why: Inductor lowers a long scan over few rows (a vocabulary
    of 128k, one row per tree node) to its split-scan Triton kernel, whose code generation
    fails on CUDA in torch 2.11 ("list indices must be integers or slices, not NoneType" in
    get_block_shape); scans of at most 8192 elements per row are never split."""
    V = x.shape[-1]
    if V <= SCAN_BLOCK:
        return x.cumsum(-1)
    nb = -(-V // SCAN_BLOCK)
    xp = torch.nn.functional.pad(x, (0, nb * SCAN_BLOCK - V)).unflatten(-1, (nb, SCAN_BLOCK))
    inner = xp.cumsum(-1)  # (..., nb, BLOCK)
    totals = inner[..., -1]  # (..., nb)
    before = torch.nn.functional.pad(totals.cumsum(-1)[..., :-1], (1, 0))  # exclusive: a shift
    return (inner + before.unsqueeze(-1)).flatten(-2)[..., :V]


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
         top_p: torch.Tensor) -> torch.Tensor:
    """Target probabilities (float32) from logits (B, ..., V) with per-row temperature (B,),
    top_k (B,) int and top_p (B,). Rows with temperature 0 get softmax(logits) (the caller takes
    their argmax path instead)."""
    B, V = logits.shape[0], logits.shape[-1]
    view = (B,) + (1,) * (logits.dim() - 1)
    t = torch.where(temperature > 0, temperature, 1.0).float().view(view)
    s = logits.float() / t
    ordered = s.sort(-1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < V), top_k, V).long().view(view)
    kth = ordered.gather(-1, (k - 1).expand(*ordered.shape[:-1], 1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # top-k, ties at the k-th kept
    # Top-p as transformers computes it: drop a token when it and every less probable token
    # together have at most 1 - top_p (an ascending cumulative sum), never the most probable.
    below = cumsum(ordered.softmax(-1).flip(-1)).flip(-1)
    keep = below > (1 - top_p.float()).view(view)
    n_keep = keep.sum(-1, keepdim=True).clamp(min=1)  # the kept tokens are a prefix
    floor = ordered.gather(-1, n_keep - 1)  # the least probable kept logit
    s = s.masked_fill(s < floor, float("-inf"))  # a threshold, not a scatter: ties are kept
    return s.softmax(-1)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from unnormalised probabilities (..., V) with uniforms u (...): the
    first index whose cumulative mass exceeds u times the total (float64 sums), found as the
    number of cumulative sums at or below it (what searchsorted(right=True) returns on a sorted
    CDF; a reduction, since Inductor's searchsorted lowering in torch 2.11 cannot read its
    boundaries from the blocked scan's view: "NotImplementedError: View")."""
    cdf = cumsum(probs.double())
    x = (u * cdf[..., -1]).unsqueeze(-1)
    idx = (cdf <= x).sum(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def _accept_prob(pc: torch.Tensor) -> torch.Tensor:
    """Children's target probabilities (..., K) in rank order -> the probability of accepting
    each under the residual left by rejecting the ones before it: p(c_j) / (1 - sum_{i<j} p(c_i))."""
    return pc / (1 - (pc.cumsum(-1) - pc)).clamp(min=1e-30)


def tree_accept(tokens: torch.Tensor, probs: torch.Tensor, children: torch.Tensor,
                depth: torch.Tensor, position: torch.Tensor, seed: torch.Tensor, max_depth: int,
                width: int | None = None):
    """Multi-round speculative sampling over a static tree.

    tokens (B, T) drafted ids (node 0 is the root, the last emitted token); probs (B, T, V) the
    target distribution at each node; children (T, K) each node's children in draft-rank order
    (-1 padded); depth (T,); position (B,) the root's position; seed (B,); max_depth D, the
    tree's depth (the levels walked); width W >= D + 1 (default D + 1), the path's columns.
    -> path (B, W) accepted node ids (root first; past n_acc: 0), n_acc (B,) accepted nodes
       with the root, bonus (B,) the token drawn at the last accepted node.
    Only the tree's own D levels are walked (past them no node has children, so nothing more
    could be accepted) and the path is padded to W: a shallow tree in an engine whose state is
    sized for a deeper one, or the root alone (plain decoding's sampled graph), carries no
    rounds that cannot accept."""
    width = max_depth + 1 if width is None else width
    if width < max_depth + 1:
        raise ValueError(f"tree_accept: width {width} < tree depth + 1 ({max_depth + 1})")
    B, T = tokens.shape
    valid = children >= 0  # (T, K)
    kids = children.clamp(min=0)
    kid_tok = tokens[:, kids]  # (B, T, K)
    pc = probs.gather(2, kid_tok) * valid  # p_n(child); 0 where there is no child
    node = torch.arange(T, device=tokens.device)
    u = uniform(seed[:, None], position[:, None] + depth, node, ACCEPT)  # (B, T): decides node c
    take = (u[:, kids] < _accept_prob(pc)) & valid  # (B, T, K)
    choice = torch.where(take.any(-1), take.int().argmax(-1), -1)  # first accepted rank, or -1
    cur = torch.zeros(B, dtype=torch.long, device=tokens.device)
    alive = torch.ones(B, dtype=torch.bool, device=tokens.device)
    path = [cur]
    for _ in range(max_depth):
        j = choice.gather(1, cur[:, None]).squeeze(1)
        alive = alive & (j >= 0)
        cur = torch.where(alive, kids[cur, j.clamp(min=0)], cur)
        path.append(torch.where(alive, cur, 0))
    path += [torch.zeros_like(cur)] * (width - 1 - max_depth)
    path = torch.stack(path, 1)  # (B, W)
    n_acc = 1 + (path[:, 1:] > 0).sum(1)
    # The bonus, at the last accepted node: every child there was rejected (or it has none), so
    # the residual is its distribution without them.
    rows = torch.arange(B, device=tokens.device)
    resid = probs[rows, cur]  # (B, V)
    # Count, per token, the real children that carry it (padding entries repeat the root's
    # token, so a scatter of values could let a padding entry undo a child's zero).
    drop = torch.zeros_like(resid).scatter_add(1, kid_tok[rows, cur], valid[cur].to(resid.dtype))
    resid = resid.masked_fill(drop > 0, 0.0)
    bonus = sample(resid, uniform(seed, position + depth[cur] + 1, cur, BONUS))
    return path, n_acc, bonus
