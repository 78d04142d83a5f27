"""EAGLE-3 heads in their reference format: a synthetic head written as the reference checkpoint
lays it out (fc over three fused layers, `midlayer.*` with a 2 x hidden attention input, its own
norm and lm_head over a d2t-mapped draft vocabulary), sharded safetensors with an index, loaded
by `load_draft` and checked against a plain-torch forward written from the reference code's
math (not from this project's modules); and the clear errors for heads that do not fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import build_engine, hf_greedy, make_tiny_checkpoint
from spec_compiler.config import eagle3_default_layers
from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_draft, load_target, read_draft
from spec_compiler.models.eagle3 import Eagle3Draft
from spec_compiler.trees import resolve_tree

H, HEADS, KV_HEADS, INTER, V, VD = 64, 4, 2, 96, 128, 40
AUX = [1, 2, 3]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("e3") / "target", num_hidden_layers=4)


def eagle3_state(seed: int = 0, vd: int | None = VD) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    hd = H // HEADS
    st = {"fc.weight": w(H, 3 * H), "midlayer.self_attn.q_proj.weight": w(HEADS * hd, 2 * H),
          "midlayer.self_attn.k_proj.weight": w(KV_HEADS * hd, 2 * H),
          "midlayer.self_attn.v_proj.weight": w(KV_HEADS * hd, 2 * H),
          "midlayer.self_attn.o_proj.weight": w(H, HEADS * hd),
          "midlayer.mlp.gate_proj.weight": w(INTER, H), "midlayer.mlp.up_proj.weight": w(INTER, H),
          "midlayer.mlp.down_proj.weight": w(H, INTER),
          "midlayer.hidden_norm.weight": 1 + w(H, scale=0.1), "midlayer.input_layernorm.weight": 1 + w(H, scale=0.1),
          "midlayer.post_attention_layernorm.weight": 1 + w(H, scale=0.1), "norm.weight": 1 + w(H, scale=0.1),
          "lm_head.weight": w(vd or V, H, scale=0.5)}
    if vd:
        hot = torch.randperm(V, generator=g)[:vd].sort().values  # the reference stores ids sorted
        st["d2t"] = hot - torch.arange(vd)
        st["t2d"] = torch.zeros(V, dtype=torch.bool).index_fill_(0, hot, True)
    return st


def write_eagle3(out: Path, state: dict[str, torch.Tensor], **config) -> Path:
    """The reference layout: config.json, and the weights in two shards with an index (the
    lm_head alone in the second, as a large one would be)."""
    out.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": INTER,
           "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": V,
           "eagle_aux_hidden_state_layer_ids": AUX}
    if "d2t" in state:
        cfg["draft_vocab_size"] = state["d2t"].numel()
    cfg.update(config)
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k != "lm_head.weight"},
              "model-00002-of-00002.safetensors": {k: v for k, v in state.items() if k == "lm_head.weight"}}
    for name, part in shards.items():
        save_file({k: v.contiguous() for k, v in part.items()}, out / name)
    wmap = {k: name for name, part in shards.items() for k in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return out


# ---- the reference forward, from the reference code's math ----
def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def reference_step(st, embed, hidden, ids, positions, past=None):
    """One call of the reference head: hidden (1, T, 3H) target features or (1, T, H) its own,
    ids (1, T), positions (T,) -> logits over the draft vocabulary, the fed-back hidden, kv."""
    T, hd = ids.shape[1], H // HEADS
    emb = embed[ids]
    if hidden.shape[-1] != emb.shape[-1]:
        hidden = hidden @ st["fc.weight"].T
    residual = hidden
    x = torch.cat((rms(emb, st["midlayer.input_layernorm.weight"]), rms(hidden, st["midlayer.hidden_norm.weight"])), -1)
    q = (x @ st["midlayer.self_attn.q_proj.weight"].T).view(1, T, HEADS, hd).transpose(1, 2)
    k = (x @ st["midlayer.self_attn.k_proj.weight"].T).view(1, T, KV_HEADS, hd).transpose(1, 2)
    v = (x @ st["midlayer.self_attn.v_proj.weight"].T).view(1, T, KV_HEADS, hd).transpose(1, 2)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(positions.float(), inv)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    if past is not None:
        k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
    kr, vr = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    P = k.shape[2] - T
    scores = q @ kr.transpose(2, 3) / math.sqrt(hd)
    mask = torch.full((T, P + T), float("-inf")).triu(P + 1)
    o = (scores + mask).softmax(-1) @ vr
    hidden = residual + o.transpose(1, 2).reshape(1, T, H) @ st["midlayer.self_attn.o_proj.weight"].T
    m = rms(hidden, st["midlayer.post_attention_layernorm.weight"])
    hidden = hidden + (F.silu(m @ st["midlayer.mlp.gate_proj.weight"].T) * (m @ st["midlayer.mlp.up_proj.weight"].T)) \
        @ st["midlayer.mlp.down_proj.weight"].T
    logits = rms(hidden, st["norm.weight"]) @ st["lm_head.weight"].T
    return logits, hidden, (k, v)


def ours_step(head: Eagle3Draft, feats, ids, positions, cache_len, kv):
    out = head(ids, feats, positions[None], torch.tensor([cache_len]), *kv)
    return out[0], out[1], out[2:]


@pytest.mark.parametrize("vd", [VD, None], ids=["draft-vocab", "full-vocab"])
def test_loads_reference_format_and_matches_reference_forward(tmp_path, target_dir, vd):
    st = eagle3_state(vd=vd)
    head_dir = write_eagle3(tmp_path / "head", st)
    target = load_target(target_dir)
    head = load_draft(head_dir, target)
    assert isinstance(head, Eagle3Draft) and head.cfg.aux_layers == tuple(AUX)
    assert head.embed_tokens.weight is target.embed_tokens.weight  # no embedding of its own: shared
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (1, 6), generator=g)
    feats = torch.randn(1, 6, 3 * H, generator=g)
    S = 16
    kv = [torch.zeros(head.cache_shape(1, S)) for _ in range(2)]
    with torch.no_grad():
        # The catch-up over six positions from the target's fused features ...
        ref_logits, ref_hidden, past = reference_step(st, target.embed_tokens.weight, feats, ids, torch.arange(6))
        logits, hidden, kv = ours_step(head, feats, ids, torch.arange(6), 0, kv)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
        # ... then two drafted tokens fed the head's own last hidden state (no fc), over the cache.
        nxt = torch.randint(0, V, (1, 2), generator=g)
        own = hidden[:, -2:]
        ref2, _, _ = reference_step(st, target.embed_tokens.weight, own, nxt, torch.arange(6, 8), past)
        got2, _, _ = ours_step(head, own, nxt, torch.arange(6, 8), 6, kv)
        torch.testing.assert_close(got2, ref2, rtol=1e-4, atol=1e-4)
    cols = logits[0, -1].topk(5).indices
    want = cols + st["d2t"][cols] if vd else cols  # the reference's token = column + d2t[column]
    assert torch.equal(head.token_ids(cols), want)


def test_reference_default_layers(tmp_path, target_dir):
    head_dir = write_eagle3(tmp_path / "head", eagle3_state(), eagle_aux_hidden_state_layer_ids=None)
    target = load_target(target_dir)  # 4 layers: the reference's default (2, 2, 1) collides
    with pytest.raises(SpecCompileError, match="default layers"):
        read_draft(head_dir, target.cfg)
    assert eagle3_default_layers(32) == (2, 16, 29)  # Llama-3.1-8B: the layers its heads were trained on
    nested = write_eagle3(tmp_path / "nested", eagle3_state(), eagle_aux_hidden_state_layer_ids=None,
                          eagle_config={"eagle_aux_hidden_state_layer_ids": [3, 0, 2]})
    assert read_draft(nested, target.cfg).cfg.aux_layers == (0, 2, 3)  # in layer order


@pytest.mark.parametrize("edit,config,words", [
    (lambda s: s.update({"fc.weight": s["fc.weight"][:, :2 * H]}), {}, "fc.weight has shape"),
    (lambda s: s.pop("lm_head.weight"), {}, "own lm_head"),
    (lambda s: s.update({"lm_head.weight": s["lm_head.weight"][:-1]}), {}, "one row per draft-vocabulary"),
    (None, {"eagle_aux_hidden_state_layer_ids": [0, 1, 9]}, "three distinct target layers"),
    (None, {"num_hidden_layers": 2}, "one decoder layer"),
    (None, {"target_hidden_size": 96}, "target_hidden_size=96"),
    (None, {"head_dim": 32}, "hidden_size / num_attention_heads"),
])
def test_bad_heads_fail_in_one_line(tmp_path, target_dir, edit, config, words):
    st = eagle3_state()
    if edit:
        edit(st)
    head_dir = write_eagle3(tmp_path / "head", st, **config)
    with pytest.raises(SpecCompileError, match=words) as e:
        read_draft(head_dir, load_target(target_dir).cfg)
    assert "\n" not in str(e.value)


def test_draft_vocab_choices(tmp_path, target_dir):
    st = eagle3_state()
    head_dir = write_eagle3(tmp_path / "head", st)
    target = load_target(target_dir)
    with pytest.raises(SpecCompileError, match="scores only its own 40-token vocabulary"):
        read_draft(head_dir, target.cfg, "full")
    head = load_draft(head_dir, target, draft_vocab=16)  # the first 16 stored columns
    assert head.lm_head.weight.shape == (16, H)
    torch.testing.assert_close(head.lm_head.weight, st["lm_head.weight"][:16])
    assert torch.equal(head.hot_ids, torch.arange(16) + st["d2t"][:16])


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, target_dir):
    head = write_eagle3(tmp_path_factory.mktemp("e3h") / "head", eagle3_state(seed=2))
    return build_engine(tmp_path_factory.mktemp("e3e") / "engine", target_dir, draft_dir=head), head


def test_eagle3_engine_is_lossless_and_drafts_from_the_fused_layers(engine_dir, target_dir):
    """Greedy output equals transformers'; the manifest records the fused layers; and the first
    draft step's depth-1 proposals are the top-k of an eager Eagle3Draft run over the prompt
    with the features transformers gives for those layers (hidden_states[i] enters layer i)."""
    from transformers import LlamaForCausalLM

    from spec_compiler.runtime import Engine

    engine_path, head_dir = engine_dir
    eng = Engine.load(engine_path)
    manifest = json.loads((engine_path / "manifest.json").read_text())
    assert manifest["draft"]["kind"] == "eagle3" and manifest["draft"]["aux_layers"] == AUX
    assert manifest["dims"]["feature_dim"] == 3 * H
    for prompt in ([5, 9, 33, 2, 71, 8], [1, 100, 7]):
        assert eng.generate(prompt, max_new_tokens=24).output_ids == hf_greedy(target_dir, prompt, 24)
    prompt = [5, 9, 33, 2, 71, 8, 40, 3]
    eng.start(prompt, max_new_tokens=8)
    tree_tokens = eng.call("draft")["tree_tokens"][0]
    hf = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    target = load_target(target_dir)
    head = load_draft(head_dir, target)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
        first = int(out.logits[0, -1].argmax())
        fused = torch.cat([out.hidden_states[i] for i in AUX], -1)  # (1, P, 3H)
        P = len(prompt)
        kv = [torch.zeros(head.cache_shape(1, 32)) for _ in range(2)]
        logits = head(torch.tensor([prompt[1:] + [first]]), fused, torch.arange(P)[None],
                      torch.tensor([0]), *kv)[0]
    tree = resolve_tree("mc_sim_7b_63")
    level1 = [n for n in range(1, tree.n_nodes) if tree.depth[n] == 1]
    cols = logits[0, -1].topk(tree.top_k).indices
    assert tree_tokens[level1].tolist() == [int(head.token_ids(cols[tree.rank[n]])) for n in level1]
    assert int(tree_tokens[0]) == first


def test_tree_auto_measures_and_builds_an_eagle3_head(tmp_path, target_dir):
    """--tree auto with an EAGLE-3 head: the cost model times its forwards (one midlayer's
    cache, hidden-wide features as the unrolled levels take them), the engine is built with the
    chosen tree, and it stays lossless."""
    from spec_compiler.cli import compile_main
    from spec_compiler.runtime import Engine
    from spec_compiler.tree_choice import ACCEPT, AcceptTable, draft_weights_sha256, measure

    head = write_eagle3(tmp_path / "head", eagle3_state(seed=4))
    target = load_target(target_dir)
    cost = measure(target, load_draft(head, target), [1, 3], [1, 2], capacity=64, context=16, rounds=1)
    assert set(cost.draft_ms) == {1, 2} and all(v > 0 for v in cost.draft_ms.values())
    rates = {(0,): 0.6, (1,): 0.2, (0, 0): 0.36, (0, 1): 0.12, (1, 0): 0.12, (0, 0, 0): 0.216}
    AcceptTable(rates, 1000, {"draft_sha256": draft_weights_sha256(head)}).write(head / ACCEPT)
    out = tmp_path / "engine"
    assert compile_main([str(target_dir), "--draft", str(head), "--out", str(out), "--backend", "eager",
                         "--max-seq-len", "64", "--prefill-chunk", "8"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["tree_choice"]["method"] == "auto" and m["draft"]["kind"] == "eagle3"
    eng = Engine.load(out)
    prompt = [5, 9, 33, 2, 71, 8]
    assert eng.generate(prompt, max_new_tokens=20).output_ids == hf_greedy(target_dir, prompt, 20)
