"""Triton kernels behind `spec::tree_attention`: split-K prefix, masked tree suffix, LSE merge.

Two launches per call (both through `torch.library.wrap_triton`, so Inductor/AOTInductor compile
them into the engine when they trace the triton_op body):

1. `_prefix_kernel`, grid (n_splits, B * Hkv, n_row_blocks): flash-decoding over the KV cache.
   One program owns one KV head and one split of `split_keys` cache slots. Its query rows are
   the G = Hq / Hkv query heads of that KV head times the T tree nodes, packed into one tile
   (row r -> head h*G + r // T, node r % T), so each K/V tile is read once for all of them
   (past 128 rows, e.g. G = 8 with T = 26, a second row block re-reads it, mostly from L2).
   No per-key mask: the prefix is every slot below cache_len[b]. The grid is fixed by the cache
   CAPACITY S, so it can be captured in a CUDA graph; a program whose split starts at or past
   cache_len[b] writes lse = -inf and nothing else. The others write the split's normalised
   output and its LSE (natural log) to fp32 scratch.
2. `_suffix_merge_kernel`, grid (B * Hkv, n_row_blocks): attention of the same packed rows over
   the Tk suffix keys (the tree nodes; for a draft level also earlier levels' nodes, so Tk may
   exceed T) with the static (T, Tk) mask, as an online softmax over BLOCK_KN-key tiles; then the
   log-sum-exp merge of the suffix with every prefix split, writing the final output in q's dtype.
   Splits with lse = -inf get weight 0 and their (never written) scratch is not read, so an empty
   split can never inject NaN; a row that sees no suffix key gets suffix weight 0 the same way.

Softmax runs in base 2 inside the kernels (exp2 of scores pre-scaled by log2(e)); the LSE that
crosses kernels is converted to natural log, matching `spec_compiler.ops.tree_attention`.
Everything accumulates in fp32. Split count, grid and block sizes depend only on shapes: no
`.item()`, no host sync. Under `TRITON_INTERPRET=1` the same kernels run on CPU tensors.

Sizes: T up to MAX_QUERIES and Tk up to MAX_SUFFIX_KEYS (`spec_compiler.kernels.limits`, which
CompileConfig reads without importing triton); larger calls raise ValueError.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .limits import MAX_HEAD_DIM, MAX_QUERIES, MAX_SUFFIX_KEYS

LOG2E = 1.4426950408889634  # log2(e): natural-log scores -> base-2 scores; the kernels turn
# base-2 LSEs back into natural log with the literal ln(2) = 0.6931471805599453 (a jit function
# cannot read a plain Python global)

MAX_BLOCK_M = 128  # packed (q head, tree node) rows per program
BLOCK_N = 64  # cache keys per inner-loop tile (prefix); also the largest suffix key tile
TARGET_PROGRAMS = 256  # prefix programs to aim for (about 2 waves on an H100)
MIN_SPLIT_KEYS = 256  # below this a split's scratch traffic outweighs its parallelism


@triton.jit
def _load_kv_tile(k_base, v_base, n, n_ok, d, d_ok, sk_n, sk_d, sv_n, sv_d):
    """Key/value rows n (N,) of one KV head, zero where not n_ok or past the head dim: two (N, D)
    tiles. k_base, v_base point at the head; sk_n, sv_n are the row strides, sk_d, sv_d the dim's."""
    mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=mask, other=0.0)
    v = tl.load(v_base + n[:, None] * sv_n + d[None, :] * sv_d, mask=mask, other=0.0)
    return k, v


@triton.jit
def _attend_tile(q, k, v, visible, qk_scale, m_i, l_i, acc):
    """One key tile of an online softmax in base 2: q (M, D); k, v (N, D); visible (M, N) or
    (1, N) bool. -> updated running max m_i (M,), sum l_i (M,) of exp2(s - m_i), and unnormalised
    acc (M, D), all fp32. A row that has seen no visible key yet keeps m_i = -inf; its exponent
    base is then 0, so alpha and p are exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN."""
    s = (tl.dot(q, tl.trans(k)) * qk_scale).to(tl.float32)  # (M, N); Inductor passes fp64 scalars
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - base)
    p = tl.exp2(s - base[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _prefix_kernel(
    Q, K, V, CacheLen, OPart, LsePart,
    qk_scale,  # softmax scale * log2(e)
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    n_kv_heads, n_tree, n_rows, n_splits, group, n_slots,
    DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_TILES: tl.constexpr,  # BLOCK_N-key tiles per split
):
    split = tl.program_id(0)
    bh = tl.program_id(1)  # b * n_kv_heads + h
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (g, t) rows
    row_ok = rows < n_rows
    cache_len = tl.minimum(tl.load(CacheLen + b).to(tl.int32), n_slots)  # never read past S
    start = split * (SPLIT_TILES * BLOCK_N)
    end = tl.minimum(start + SPLIT_TILES * BLOCK_N, cache_len)
    part = (bh.to(tl.int64) * n_splits + split) * n_rows + rows  # (BLOCK_M,) scratch row index

    if start >= end:  # split entirely past cache_len: empty, zero weight in the merge
        tl.store(LsePart + part, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)
    else:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DH
        q_head = h * group + rows // n_tree
        q_off = b.to(tl.int64) * sqb + q_head.to(tl.int64) * sqh + (rows % n_tree) * sqt
        q = tl.load(Q + q_off[:, None] + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base 2
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Fixed trip count: tiles past `end` are fully masked, so they read no memory and leave
        # m_i, l_i, acc unchanged. A data-dependent bound would save their math in the one partial
        # split, but the interpreter (triton 3.6, numpy >= 2.4) cannot loop to a runtime value.
        for i in range(0, SPLIT_TILES):
            n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k, v = _load_kv_tile(k_base, v_base, n, n_ok, d, d_ok, sks, skd, svs, svd)  # (BLOCK_N, BLOCK_D)
            # m_i is finite after the first tile: it has a key below end
            m_i, l_i, acc = _attend_tile(q, k, v, n_ok[None, :], qk_scale, m_i, l_i, acc)

        o = acc / l_i[:, None]
        tl.store(OPart + part[:, None] * DH + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LsePart + part, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)  # ln


@triton.jit
def _suffix_merge_kernel(
    Q, KN, VN, Mask, OPart, LsePart, Out,
    qk_scale,  # softmax scale * log2(e)
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smi, smj,
    sob, soh, sot, sod,
    n_kv_heads, n_tree, n_keys, n_rows, group,  # n_tree queries, n_keys suffix keys (>= n_tree
    # when the draft's suffix also holds earlier levels' keys)
    DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KN: tl.constexpr,
    KEY_TILES: tl.constexpr,  # BLOCK_KN-key suffix tiles: cdiv(n_keys, BLOCK_KN)
    N_SPLITS: tl.constexpr,  # constexpr loop bounds: see SPLIT_TILES in _prefix_kernel
):
    bh = tl.program_id(0)  # b * n_kv_heads + h
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (g, t) rows
    row_ok = rows < n_rows
    node = rows % n_tree
    q_head = h * group + rows // n_tree
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    io_mask = row_ok[:, None] & d_ok[None, :]

    # ---- suffix: packed rows x the Tk suffix keys, static (T, Tk) mask, online softmax ----
    q_off = b.to(tl.int64) * sqb + q_head.to(tl.int64) * sqh + node * sqt
    q = tl.load(Q + q_off[:, None] + d[None, :] * sqd, mask=io_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    kn_base = KN + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vn_base = VN + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base 2
    l_s = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_s)
    o_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalised
    # Fixed trip count, as in _prefix_kernel. Unlike there, a row may see no key in whole tiles
    # (or in any: a padding row, a row the mask hides everything from): _attend_tile keeps it
    # at weight 0 without NaN.
    for i in range(0, KEY_TILES):
        j = i * BLOCK_KN + tl.arange(0, BLOCK_KN)
        j_ok = j < n_keys
        kn, vn = _load_kv_tile(kn_base, vn_base, j, j_ok, d, d_ok, skt, skd, svt, svd)  # (BLOCK_KN, BLOCK_D)
        visible = tl.load(Mask + node[:, None] * smi + j[None, :] * smj,
                          mask=row_ok[:, None] & j_ok[None, :], other=0) != 0  # (BLOCK_M, BLOCK_KN)
        m_s, l_s, o_s = _attend_tile(q, kn, vn, visible, qk_scale, m_s, l_s, o_s)
    has_s = l_s > 0  # a visible key contributes exp2(0) = 1 at its row's max
    o_s = o_s / tl.where(has_s, l_s, 1.0)[:, None]
    lse_s = tl.where(has_s, (m_s + tl.log2(tl.where(has_s, l_s, 1.0))) * 0.6931471805599453,
                     float("-inf"))

    # ---- merge: suffix + every prefix split, weights exp(lse_i - max lse) ----
    part0 = bh.to(tl.int64) * N_SPLITS * n_rows + rows  # (BLOCK_M,) row of split 0
    m = lse_s
    for i in range(N_SPLITS):
        m = tl.maximum(m, tl.load(LsePart + part0 + i * n_rows, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)  # all parts empty: every weight is exp(-inf) = 0
    w_s = tl.exp(lse_s - m)
    acc = o_s * w_s[:, None]
    den = w_s
    for i in range(N_SPLITS):
        lse_i = tl.load(LsePart + part0 + i * n_rows, mask=row_ok, other=float("-inf"))
        live = lse_i > float("-inf")  # empty splits never wrote their output: don't read it
        o_i = tl.load(OPart + (part0 + i * n_rows)[:, None] * DH + d[None, :],
                      mask=io_mask & live[:, None], other=0.0)
        w_i = tl.exp(lse_i - m)
        acc += o_i * w_i[:, None]
        den += w_i
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    o_off = b.to(tl.int64) * sob + q_head.to(tl.int64) * soh + node * sot
    tl.store(Out + o_off[:, None] + d[None, :] * sod, out.to(Out.dtype.element_ty), mask=io_mask)


def _block_m(n_rows: int) -> int:
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(n_rows)))


def _block_kn(n_keys: int) -> int:
    """Suffix keys per tile: the whole suffix up to BLOCK_N keys (one trip), then BLOCK_N-key tiles
    (the prefix kernel's tile, same register budget: a 128 x BLOCK_N fp32 score tile)."""
    return min(BLOCK_N, max(16, triton.next_power_of_2(n_keys)))


def _num_warps(block_m: int, head_dim: int) -> int:
    # 4 warps on a 128 x 64 fp32 accumulator reach 255 registers (sm_90); 8 warps: ~150, no spills.
    return 8 if block_m * head_dim >= 128 * 64 else 4


def default_split_keys(S: int, n_programs_per_split: int) -> int:
    """Cache slots per prefix split: enough splits to fill the GPU, none shorter than MIN_SPLIT_KEYS."""
    want = max(1, triton.cdiv(TARGET_PROGRAMS, n_programs_per_split))
    keys = max(MIN_SPLIT_KEYS, triton.cdiv(S, want))
    return triton.cdiv(keys, BLOCK_N) * BLOCK_N


def _check(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask):
    """ValueError unless the shapes fit each other and the kernels' limits (shapes only: no sync)."""
    B, Hq, T, Dh = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    Tk = k_new.shape[2]
    problems = [
        (k_cache.shape == v_cache.shape == (B, Hkv, S, Dh),
         f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be "
         f"({B}, Hkv, S, {Dh}) for q {tuple(q.shape)}"),
        (k_new.shape == v_new.shape == (B, Hkv, Tk, Dh),
         f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must be ({B}, {Hkv}, Tk, {Dh})"),
        (Hq % Hkv == 0, f"n_q_heads={Hq} must be a multiple of n_kv_heads={Hkv}"),
        (1 <= T <= MAX_QUERIES,
         f"{T} queries; the kernels handle 1..{MAX_QUERIES} per call (MAX_QUERIES)"),
        (1 <= Tk <= MAX_SUFFIX_KEYS,
         f"{Tk} suffix keys; the kernels handle 1..{MAX_SUFFIX_KEYS} per call (MAX_SUFFIX_KEYS)"),
        (Dh <= MAX_HEAD_DIM, f"head_dim={Dh}; the kernels handle up to {MAX_HEAD_DIM} (MAX_HEAD_DIM)"),
        (tuple(cache_len.shape) == (B,), f"cache_len {tuple(cache_len.shape)}, expected ({B},)"),
        (tuple(tree_mask.shape) == (T, Tk), f"tree_mask {tuple(tree_mask.shape)}, expected ({T}, {Tk})"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(f"tree_attention_triton: {message}")


def prefix_partials(q, k_cache, v_cache, cache_len, scale, *, split_keys=None):
    """Split-K prefix pass -> o_part (B, Hkv, n_splits, G*T, Dh), lse_part (B, Hkv, n_splits, G*T).

    Both fp32. Row r of KV head h is query head h*G + r // T, tree node r % T. Splits with no key
    below cache_len have lse = -inf and an unwritten (garbage) o_part.
    """
    B, Hq, T, Dh = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    n_rows = group * T
    block_m = _block_m(n_rows)
    n_row_blocks = triton.cdiv(n_rows, block_m)
    if split_keys is None:
        split_keys = default_split_keys(S, B * Hkv * n_row_blocks)
    assert split_keys % BLOCK_N == 0, f"split_keys={split_keys} must be a multiple of {BLOCK_N}"
    n_splits = max(1, triton.cdiv(S, split_keys))
    o_part = torch.empty(B, Hkv, n_splits, n_rows, Dh, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hkv, n_splits, n_rows, device=q.device, dtype=torch.float32)
    wrap_triton(_prefix_kernel)[(n_splits, B * Hkv, n_row_blocks)](
        q, k_cache, v_cache, cache_len, o_part, lse_part,
        scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        Hkv, T, n_rows, n_splits, group, S,
        DH=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        SPLIT_TILES=split_keys // BLOCK_N,
        num_warps=_num_warps(block_m, Dh), num_stages=2,
    )
    return o_part, lse_part


def suffix_merge(q, k_new, v_new, tree_mask, scale, o_part, lse_part):
    """Suffix pass over the Tk suffix keys k_new/v_new (B, Hkv, Tk, Dh) with tree_mask (T, Tk),
    merged by LSE with the prefix partials. -> (B, Hq, T, Dh) in q's dtype."""
    B, Hq, T, Dh = q.shape
    Hkv = k_new.shape[1]
    group = Hq // Hkv
    n_rows = group * T
    block_m = _block_m(n_rows)
    n_splits = lse_part.shape[2]
    assert o_part.is_contiguous() and lse_part.is_contiguous()
    assert tuple(lse_part.shape) == (B, Hkv, n_splits, n_rows), lse_part.shape
    Tk = k_new.shape[2]
    block_kn = _block_kn(Tk)
    mask_i8 = tree_mask.to(torch.int8)  # (T, Tk); bool pointers are avoided on purpose
    out = torch.empty(B, Hq, T, Dh, device=q.device, dtype=q.dtype)
    wrap_triton(_suffix_merge_kernel)[(B * Hkv, triton.cdiv(n_rows, block_m))](
        q, k_new, v_new, mask_i8, o_part, lse_part, out,
        scale * LOG2E,
        *q.stride(), *k_new.stride(), *v_new.stride(), *mask_i8.stride(), *out.stride(),
        Hkv, T, Tk, n_rows, group,
        DH=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)), BLOCK_M=block_m,
        BLOCK_KN=block_kn, KEY_TILES=triton.cdiv(Tk, block_kn), N_SPLITS=n_splits,
        # num_stages=1: software-pipelining the key-tile loop spills on sm_90 at 128 rows x
        # Dh 128 (255 registers + stack; about 250 and no spill with 1 stage).
        num_warps=_num_warps(block_m, Dh), num_stages=1,
    )
    return out


def tree_attention_triton(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale, *,
                          split_keys=None):
    """Two-pass tree attention with Triton kernels: split-K prefix, masked suffix, LSE merge.

    Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`
    set before triton is imported). Inputs may be non-contiguous views; strides are passed.

    Parameters
    ----------
    q : Tensor (B, Hq, T, Dh), bf16/fp16/fp32
        Queries of the T tree nodes. Dh up to 256 (masked to a power of two); 64 and 128 are the
        tested and tuned sizes.
    k_cache, v_cache : Tensor (B, Hkv, S, Dh), q's dtype
        KV cache of capacity S; slots [0, cache_len[b]) are the prefix. Hq % Hkv == 0 (GQA).
    k_new, v_new : Tensor (B, Hkv, Tk, Dh), q's dtype
        K/V of the suffix: the tree nodes (Tk = T), or for a draft level also the nodes of the
        levels before it (Tk > T). 1 <= Tk <= MAX_SUFFIX_KEYS.
    cache_len : Tensor (B,) int64
        Prefix length per sequence, read on the device (no host sync); values past S act as S.
    tree_mask : Tensor (T, Tk) bool
        True where query i may attend to suffix key j (its ancestors and itself).
        1 <= T <= MAX_QUERIES.
    scale : float
        Softmax scale, usually 1 / sqrt(Dh).
    split_keys : int, optional
        Cache slots per prefix split (a multiple of BLOCK_N). Default: `default_split_keys`, a
        function of the shapes only, so the grid is fixed for CUDA-graph capture.

    Returns
    -------
    Tensor (B, Hq, T, Dh) in q's dtype (fp32 accumulation).
    """
    _check(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask)
    o_part, lse_part = prefix_partials(q, k_cache, v_cache, cache_len, scale, split_keys=split_keys)
    return suffix_merge(q, k_new, v_new, tree_mask, scale, o_part, lse_part)
