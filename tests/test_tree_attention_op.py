"""`spec::tree_attention` on CPU: the two-pass reference and the op (float32, bf16) against one
SDPA call, and the LSE merge's handling of empty partials (no NaN).

The reference is the ground truth the Triton kernels are tested against
(tests/test_tree_attention_kernels.py), so it is itself checked here against the obvious
formulation: one masked attention over [cache[:L] | tree] in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spec_compiler.ops.tree_attention import (
    NEG_INF,
    attend_reference,
    merge_reference,
    tree_attention_reference,
)
from spec_compiler.trees import resolve_tree

TREE_MASK = resolve_tree("mc_sim_7b_63").tree_mask()  # (26, 26), bushy, depth 5


def make_inputs(B=2, Hkv=2, G=3, T=26, Dh=16, S=48, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = rnd(B, Hkv * G, T, Dh)  # (B, Hq, T, Dh)
    k_cache, v_cache = rnd(B, Hkv, S, Dh), rnd(B, Hkv, S, Dh)  # (B, Hkv, S, Dh)
    k_new, v_new = rnd(B, Hkv, T, Dh), rnd(B, Hkv, T, Dh)  # (B, Hkv, T, Dh)
    return q, k_cache, v_cache, k_new, v_new


def sdpa_one_call(q, k_cache, v_cache, k_new, v_new, cache_len, tree_mask, scale):
    """Attention over [cache | tree] as ONE call: prefix visible below cache_len, tree = tree_mask."""
    B, _, T, _ = q.shape
    S = k_cache.shape[2]
    prefix = torch.arange(S)[None, :] < cache_len[:, None]  # (B, S)
    mask = torch.cat([prefix[:, None, :].expand(B, T, S),
                      tree_mask[None].expand(B, T, T)], dim=-1)  # (B, T, S + T)
    k = torch.cat([k_cache, k_new], dim=2)  # (B, Hkv, S + T, Dh)
    v = torch.cat([v_cache, v_new], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("cache_len", [[0, 0], [1, 0], [17, 5], [48, 31], [48, 48]],
                         ids=lambda c: "L=" + "-".join(map(str, c)))
def test_reference_matches_one_sdpa_call(cache_len):
    q, kc, vc, kn, vn = make_inputs()  # float64, GQA 3, bushy 26-node tree
    cl = torch.tensor(cache_len)
    scale = 1 / math.sqrt(q.shape[-1])
    ref = tree_attention_reference(q, kc, vc, kn, vn, cl, TREE_MASK, scale)
    want = sdpa_one_call(q, kc, vc, kn, vn, cl, TREE_MASK, scale)
    assert ref.dtype == torch.float64
    # Float64 end to end: the split + LSE merge is exact, so only float64 rounding remains; an
    # indexing or merge bug would be off by O(0.1).
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cache_len", [[40, 0], [48, 17]], ids=lambda c: "L=" + "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_on_cpu_matches_one_sdpa_call(dtype, cache_len):
    """The op as the engine calls it (float32 / bf16 on CPU) against the independent formulation:
    one float64 SDPA over [cache[:L] | tree] on the same (already rounded) inputs."""
    import spec_compiler.ops.tree_attention  # noqa: F401  (registers torch.ops.spec)

    q, kc, vc, kn, vn = make_inputs(G=4, dtype=dtype, seed=1)
    cl = torch.tensor(cache_len)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.ops.spec.tree_attention(q, kc, vc, kn, vn, cl, TREE_MASK, scale)
    assert out.shape == q.shape and out.dtype == dtype
    want = sdpa_one_call(*(x.double() for x in (q, kc, vc, kn, vn)), cl, TREE_MASK, scale)

    # Tolerance: the op accumulates in float32 (unit roundoff u = 2^-24), so by Higham's gamma_n
    # bounds (n terms -> n*u) its error is at most u * vmax * (N + 2*Dh*smax + 4*(smax + ln N) + 8):
    # P@V sums N = S + T keys (N*u*vmax); each score sums Dh products (error Dh*u*smax, where smax
    # bounds scale*sum|q_i k_i|), and a score error d shifts out by at most 2*vmax*d; exp and the
    # log-sum-exp carry relative errors ~u*(|s| + |lse|) <= u*(smax + ln N), counted with margin;
    # the two-pass merge adds a few u. bf16 output then rounds once more: relative 2^-8 (8
    # significant bits, round to nearest). An indexing or mask bug is off by O(0.1).
    N, Dh = kc.shape[2] + kn.shape[2], q.shape[-1]
    k_all = torch.cat([kc, kn], 2).double().repeat_interleave(q.shape[1] // kc.shape[1], dim=1)
    smax = float((q.double().abs() @ k_all.abs().transpose(-1, -2)).max()) * scale
    vmax = float(torch.cat([vc, vn], 2).double().abs().max())
    atol = 2**-24 * vmax * (N + 2 * Dh * smax + 4 * (smax + math.log(N)) + 8)
    rtol = 2**-8 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol * (1 + rtol))


def test_op_exports_as_one_node():
    import spec_compiler.ops.tree_attention  # noqa: F401

    class Attn(torch.nn.Module):
        def forward(self, q, kc, vc, kn, vn, cl, tm):
            return torch.ops.spec.tree_attention(q, kc, vc, kn, vn, cl, tm, 0.25)

    args = (*make_inputs(dtype=torch.float32), torch.tensor([5, 9]), TREE_MASK)
    ep = torch.export.export(Attn(), args)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.spec.tree_attention.default], ops
    torch.testing.assert_close(ep.module()(*args), Attn()(*args))


def test_merge_empty_partial_gives_zero_weight_not_nan():
    g = torch.Generator().manual_seed(2)
    o_a = torch.randn(2, 3, 5, 8, generator=g)  # (B, H, T, Dh)
    lse_a = torch.randn(2, 3, 5, generator=g)
    empty_o = torch.zeros_like(o_a)
    empty_lse = torch.full_like(lse_a, NEG_INF)

    out, lse = merge_reference(o_a, lse_a, empty_o, empty_lse)  # one side empty
    torch.testing.assert_close(out, o_a)
    torch.testing.assert_close(lse, lse_a)
    out, lse = merge_reference(empty_o, empty_lse, o_a, lse_a)
    torch.testing.assert_close(out, o_a)

    out, lse = merge_reference(empty_o, empty_lse, empty_o, empty_lse)  # both empty
    assert not out.isnan().any() and (out == 0).all()
    assert (lse == NEG_INF).all()


def test_attend_row_with_no_visible_key_is_empty():
    q, k, v, _, _ = make_inputs(B=1, S=6, dtype=torch.float32)
    mask = torch.zeros(1, 1, q.shape[2], k.shape[2], dtype=torch.bool)  # nothing visible
    out, lse = attend_reference(q, k, v, mask, 0.25)
    assert not out.isnan().any() and (out == 0).all()
    assert (lse == NEG_INF).all()


@pytest.mark.slow
def test_aoti_cpu_compiles_the_reference_path(tmp_path):
    import spec_compiler.ops.tree_attention  # noqa: F401

    class Attn(torch.nn.Module):
        def forward(self, q, kc, vc, kn, vn, cl, tm):
            return torch.ops.spec.tree_attention(q, kc, vc, kn, vn, cl, tm, 0.25)

    args = (*make_inputs(dtype=torch.float32), torch.tensor([5, 48]), TREE_MASK)
    ep = torch.export.export(Attn(), args)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "attn.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(runner(*args), Attn()(*args), rtol=1e-5, atol=1e-5)
