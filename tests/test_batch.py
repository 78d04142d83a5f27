"""Batches (eager backend, fast): engines built with --max-batch N decode many sequences at once,
each with its own cache length, acceptance, done flag and output, in batch buckets 1, 2, 4, ...

Every sequence of a batch gives exactly what it gives alone (greedy: the same tokens and
accept lengths, which are transformers' greedy tokens; sampled: the same tokens for the same
seed, whatever its slot and batch-mates), with prompts of different lengths, sequences ending
at different times and for different reasons, more prompts than slots (queued, slots reused),
and a draft that knows every sequence's continuation (so acceptance is ragged across slots).
Slots that are not live (free, finished, mid-prefill) never write live state.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import build_engine, hf_greedy
from spec_compiler import engine_format as fmt
from spec_compiler.cli import compile_main
from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_draft, load_target
from spec_compiler.runtime import Engine

MAX_BATCH = 3  # buckets 1, 2, 3
SEQ_LEN = 96
PROMPT_LENS = (20, 1, 37, 8, 16, 5)  # several chunks, one token, ..., exactly one chunk
MAX_NEW = (None, 12, 30, 9, 25, 17)  # the first runs to the context limit


def _prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in PROMPT_LENS]


class MultiOracleDraft(nn.Module):
    """A test-only draft that knows the greedy continuations of several sequences: the pair
    (token t at rotary position p) of any of them predicts that sequence's token at p + 2,
    ranked `rank_of(p)` among eight decoys, except at `poisoned(p)` positions. (helpers'
    OracleDraft knows one sequence: its table is keyed by the position alone.) It keeps the
    real draft's layers, so every pass applies, and overrides only the logits."""

    def __init__(self, inner, seqs, capacity: int, vocab: int, rank_of, poisoned):
        super().__init__()
        self.inner, self.vocab = inner, vocab
        table = torch.zeros(capacity, vocab, vocab)
        decoys = torch.arange(8, 0, -1, dtype=torch.float32) + 10  # 18, 17, ... on ids 0..7
        table[:, :, :8] = decoys
        for s in seqs:
            for p in range(min(capacity, len(s) - 2)):
                true = s[p + 2]
                row = table[p, s[p + 1]]
                row[:8] = decoys
                row[true] = -10.0 if poisoned(p) else 18.0 - rank_of(p) + 0.5
        self.register_buffer("table", table.view(capacity * vocab, vocab))

    hot_ids = None

    def forward(self, tokens, features, input_pos, cache_len, *kv):
        logits, x, *new_kv = self.inner(tokens, features, input_pos, cache_len, *kv)
        return (logits * 0 + F.embedding(input_pos * self.vocab + tokens, self.table), x, *new_kv)


def _build(out, model_dir, tree, draft_dir, draft_module=None, max_batch=MAX_BATCH, **kw):
    """helpers.build_engine with this file's defaults (eager, SEQ_LEN, MAX_BATCH slots)."""
    return build_engine(out, model_dir, tree=tree, draft_dir=draft_dir, draft_module=draft_module,
                        max_batch=max_batch, **{"max_seq_len": SEQ_LEN, **kw})


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    """The tiny model (EOS 2): the fourth prompt's greedy continuation is EOS after one token,
    the first one's has none before the context limit."""
    return tiny_dir


@pytest.fixture(scope="module")
def references(model_dir):
    """Each prompt + its greedy continuation (the oracle draft's knowledge)."""
    return [p + hf_greedy(model_dir, p, 200) for p in _prompts()]


ORACLE = {"chain-2": (lambda p: 0, lambda p: p % 5 == 0),
          "mc_sim_7b_63": (lambda p: (p // 2) % 2, lambda p: p % 7 in (0, 3))}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, model_dir, tiny_draft_dir, references):
    root = tmp_path_factory.mktemp("batch_engines")
    out = {}
    for tree, (rank_of, poisoned) in ORACLE.items():
        inner = load_draft(tiny_draft_dir, load_target(model_dir))
        oracle = MultiOracleDraft(inner, references, capacity=SEQ_LEN, vocab=128, rank_of=rank_of,
                                  poisoned=poisoned)
        out[tree] = _build(root / tree, model_dir, tree, tiny_draft_dir, oracle)
    return out


def test_manifest_records_the_buckets(engines):
    assert fmt.buckets(1) == (1,) and fmt.buckets(4) == (1, 2, 4) and fmt.buckets(5) == (1, 2, 4, 5)
    d = engines["chain-2"]
    m = json.loads((d / fmt.MANIFEST).read_text())
    assert m["buckets"] == [1, 2, 3] and m["dims"]["batch"] == 3
    for name in ("prefill", "draft_prefill"):  # per slot: batch 1 only
        assert m["graphs"][name]["batch"] == 1 and "buckets" not in m["graphs"][name]
    for name in ("draft", "verify", "verify_sampled"):
        assert m["graphs"][name]["file"] == f"{name}.pt2"
        assert {b: e["file"] for b, e in m["graphs"][name]["buckets"].items()} == \
            {"2": f"{name}.b2.pt2", "3": f"{name}.b3.pt2"}
        assert (d / f"{name}.b3.pt2").is_file()
    assert len(list(d.glob("*.safetensors"))) == 1  # weights shared by every bucket
    engine = Engine.load(d)
    assert engine.buckets == (1, 2, 3) and engine.state["cache_len"].shape == (3,)
    assert engine.state["target.k_0"].shape[0] == 3  # caches for the largest bucket


def test_max_live_caps_the_bucket_and_keeps_each_output(engines):
    """generate_batch(max_live=N): at most N sequences live at once, so every step runs a bucket
    of at most N (slots are taken lowest first), and each sequence's tokens, stop reason and
    accept lengths are what it gives with every slot in use. A max_live outside 1..max_batch is
    one clear error."""
    engine = Engine.load(engines["chain-2"])
    prompts = _prompts()
    full = engine.generate_batch(prompts, max_new_tokens=list(MAX_NEW))
    steps, step = [], engine._step
    engine._step = lambda b, verify: (steps.append(b), step(b, verify))[1]
    try:
        capped = engine.generate_batch(prompts, max_new_tokens=list(MAX_NEW), max_live=2)
    finally:
        engine._step = step
    assert steps and max(steps) == 2
    for f, c in zip(full, capped):
        assert (c.output_ids, c.stop_reason, c.accept_lengths) == (f.output_ids, f.stop_reason, f.accept_lengths)
    for bad in (0, engine.max_batch + 1, 1.5):
        with pytest.raises(SpecCompileError, match="max_live.*--max-batch"):
            engine.generate_batch(prompts[:1], max_new_tokens=4, max_live=bad)


def test_a_prefill_chunk_run_again_changes_nothing(engines):
    """Capturing a slot's prefill as a CUDA graph runs the chunk twice more first (warm-up) and
    then replays it: a prefill chunk must be idempotent over its slot's rows, reading only the
    static inputs (`_pf_*`) and the slot's own state. Running every chunk three times gives
    every sequence the same tokens and accept lengths as once, in a full batch."""
    engine = Engine.load(engines["mc_sim_7b_63"])
    prompts = _prompts()
    once = engine.generate_batch(prompts, max_new_tokens=list(MAX_NEW))
    run = engine._prefill_run
    engine._prefill_run = lambda i: [run(i) for _ in range(3)][-1]
    try:
        thrice = engine.generate_batch(prompts, max_new_tokens=list(MAX_NEW))
    finally:
        engine._prefill_run = run
    for a, b in zip(once, thrice):
        assert (b.output_ids, b.accept_lengths, b.stop_reason) == (a.output_ids, a.accept_lengths, a.stop_reason)


@pytest.mark.parametrize("tree", list(ORACLE))
def test_batched_greedy_equals_solo_and_transformers(engines, model_dir, references, tree):
    """Six prompts through three slots: each sequence's tokens and accept lengths are what it
    gives alone, its tokens are transformers' greedy tokens, and it stops for its own reason
    (EOS, max-new-tokens, the context limit)."""
    engine = Engine.load(engines[tree])
    prompts = _prompts()
    solo = [engine.generate(p, max_new_tokens=m) for p, m in zip(prompts, MAX_NEW)]
    batch = engine.generate_batch(prompts, max_new_tokens=list(MAX_NEW))
    eos = set(engine.spec.model.eos_token_ids)
    for p, m, s, b in zip(prompts, MAX_NEW, solo, batch):
        assert b.output_ids == s.output_ids, (p, b.output_ids, s.output_ids)
        assert (b.stop_reason, b.verify_calls, b.accept_lengths) == \
            (s.stop_reason, s.verify_calls, s.accept_lengths)
        assert b.tokens_per_call == s.tokens_per_call and b.prompt_tokens == len(p)
        if b.stop_reason != "length":
            assert b.output_ids == hf_greedy(model_dir, p, m or 200), p
        else:  # the context limit: a prefix of the EOS-free continuation, no EOS in it
            assert b.output_ids == references[prompts.index(p)][len(p):len(p) + len(b.output_ids)]
            assert not eos & set(b.output_ids)
    assert {b.stop_reason for b in batch} == {"eos", "max_new_tokens", "length"}
    assert max(max(b.accept_lengths) for b in batch) >= 3, "the oracle draft should be accepted"
    assert len({b.verify_calls for b in batch}) >= 4, "sequences should end at different steps"


def test_slot_api_reuses_slots_without_stale_tokens(engines, references):
    """admit -> step -> finished -> admit again into the freed slot: the new sequence sees
    nothing of the old one (its output row is rewritten, its cache is prefilled over), and
    the bucket follows the highest live slot."""
    engine = Engine.load(engines["mc_sim_7b_63"])
    prompts = _prompts()
    solo = {i: engine.generate(prompts[i], max_new_tokens=n) for i, n in ((2, 40), (4, 25), (1, 6), (3, 8))}
    buckets = []
    step = engine._step
    engine._step = lambda b, verify: (buckets.append(b), step(b, verify))
    with engine.session():
        assert engine.admit(prompts[2], max_new_tokens=40) == 0  # long: stays in slot 0
        assert engine.admit(prompts[4], max_new_tokens=25) == 1
        assert engine.free_slots() == 1
        done = {}
        while 1 not in done:
            engine.step()
            done.update(engine.finished())
        assert set(done) == {1} and done[1].output_ids == solo[4].output_ids
        assert engine.free_slots() == 2
        assert engine.admit(prompts[1], max_new_tokens=6) == 1  # slot 1 again: a shorter sequence
        assert engine.admit(prompts[3], max_new_tokens=8) == 2
        with pytest.raises(SpecCompileError, match="no free slot: all 3 slots are taken"):
            engine.admit(prompts[0], max_new_tokens=4)
        buckets.clear()
        results, after_2 = {}, None
        while engine.running():
            engine.step()
            for slot, res in engine.finished().items():
                results[slot] = res
                if slot == 1:  # slot 1's row: its own tokens, then zeros (none of the old ones)
                    n_out = int(engine.state["n_out"][1])
                    assert not engine.state["out_buf"][1, n_out:-1].any()
                if slot == 2:
                    after_2 = len(buckets)
    assert results[1].output_ids == solo[1].output_ids  # nothing of prompts[4]'s tokens
    assert results[1].accept_lengths == solo[1].accept_lengths
    assert results[2].output_ids == solo[3].output_ids
    assert results[0].output_ids == solo[2].output_ids
    assert after_2 is not None and after_2 < len(buckets), "slot 2 should finish before slot 0"
    assert 3 in buckets[:after_2] and set(buckets[after_2:]) <= {1, 2}  # shrinks once slot 2 is gone


def test_parked_slots_never_write_live_state(engines):
    """A finished slot and a slot mid-prefill sit below a live one, so the steps (bucket 3)
    compute their rows too: the finished slot's output and bookkeeping stay as they were, the
    pending slot's prefilled cache rows (target and draft) are untouched, bit for bit, by steps
    of either verify graph, and it then decodes exactly as it does alone."""
    engine = Engine.load(engines["mc_sim_7b_63"])
    prompts = _prompts()
    st = engine.state
    with engine.session():
        engine._free_all()
        assert engine.admit(prompts[1], max_new_tokens=2) == 0
        assert engine.admit(prompts[3], max_new_tokens=3) == 1  # finished, never read below
        assert engine.admit(prompts[4], max_new_tokens=60) == 2  # live throughout
        while not all(engine._slots[i].live and bool(st["done"][i]) for i in (0, 1)):
            engine.step()
        engine.cancel(0)
        # (out_buf's and accept_hist's last columns take every masked write: not state)
        frozen = {k: st[k][1].clone() for k in ("n_out", "n_steps", "cache_len", "acc_tokens", "n_acc")}
        frozen |= {k: st[k][1, :-1].clone() for k in ("out_buf", "accept_hist")}
        assert engine.admit(prompts[2], max_new_tokens=5) == 0  # 37 tokens: three chunks
        for chunk in (1, 2):
            engine._prefill_chunk(0)
            n = 16 * chunk
            kv = {k: v[0, :, :n].clone() for k, v in st.items() if k.startswith(("target.", "draft."))}
            assert all(v.abs().sum() > 0 for v in kv.values())
            for verify in ("verify", "verify_sampled"):
                engine._step(3, verify)
            for k, v in kv.items():
                assert torch.equal(st[k][0, :, :n], v), (chunk, k)
            assert not bool(st["slot_valid"][0])
        while engine.running():
            engine.step()
        for k, v in frozen.items():
            assert torch.equal(st[k][1, :v.shape[0]] if v.dim() else st[k][1], v), k
        res = engine.finished()
    assert set(res) == {0, 1, 2}
    assert res[0].output_ids == engine.generate(prompts[2], max_new_tokens=5).output_ids
    assert res[1].output_ids == engine.generate(prompts[3], max_new_tokens=3).output_ids


def test_sampled_tokens_depend_only_on_the_seed(engines, model_dir):
    """Sampling in a batch: a sequence's tokens are those generate() gives it alone with its
    seed, whatever its slot and batch-mates (the prompts permuted); a single seed gives prompt i
    seed + i; greedy rows in the same batch stay transformers' greedy tokens."""
    engine = Engine.load(engines["chain-2"])
    prompts = _prompts()[:5]
    temps = [1.0, 0.0, 0.7, 1.3, 0.0]
    batch = engine.generate_batch(prompts, max_new_tokens=20, temperature=temps, top_p=0.95, seed=11)
    for i, (p, t, b) in enumerate(zip(prompts, temps, batch)):
        solo = engine.generate(p, max_new_tokens=20, temperature=t, top_p=0.95, seed=11 + i)
        assert b.output_ids == solo.output_ids, i
        assert b.seed == (11 + i if t > 0 else None)
        if t == 0:
            assert b.output_ids == hf_greedy(model_dir, p, 20)
    order = [3, 0, 4, 2, 1]
    permuted = engine.generate_batch([prompts[i] for i in order], max_new_tokens=20,
                                     temperature=[temps[i] for i in order], top_p=0.95,
                                     seed=[11 + i for i in order])
    for j, i in enumerate(order):
        assert permuted[j].output_ids == batch[i].output_ids
    fresh = engine.generate_batch(prompts[:2], max_new_tokens=4, temperature=1.0)
    assert all(isinstance(r.seed, int) for r in fresh) and fresh[0].seed != fresh[1].seed


def test_cancel_frees_a_slot_and_spares_the_others(engines):
    engine = Engine.load(engines["chain-2"])
    prompts = _prompts()
    solo = engine.generate(prompts[4], max_new_tokens=25).output_ids
    with engine.session():
        engine._free_all()
        a = engine.admit(prompts[2], max_new_tokens=30)
        b = engine.admit(prompts[4], max_new_tokens=25)
        for _ in range(4):
            engine.step()
        engine.cancel(a)
        assert engine.free_slots() == 2
        with pytest.raises(SpecCompileError, match="no request in that slot"):
            engine.cancel(a)
        res = {}
        while engine.running():
            engine.step()
            res.update(engine.finished())
    assert set(res) == {b} and res[b].output_ids == solo


def test_bad_batch_inputs_fail_in_one_line(engines, tmp_path, tiny_dir):
    engine = Engine.load(engines["chain-2"])
    prompts = _prompts()[:3]
    cases = [
        (dict(max_new_tokens=[4, 5]), "max_new_tokens: a list of 2 values for 3 prompts"),
        (dict(temperature=[0.0] * 4), "temperature: a list of 4 values for 3 prompts"),
        (dict(seed=[1, 2]), "seed: a list of 2 values for 3 prompts"),
        (dict(top_p=[1.0, 2.0, 1.0]), "--top-p 2.0"),
        (dict(max_new_tokens=[4, 0, 4]), "--max-new-tokens 0"),
        (dict(seed="7", temperature=1.0), "seed '7': must be an integer"),
    ]
    for kw, msg in cases:
        with pytest.raises(SpecCompileError, match=msg) as e:
            engine.generate_batch(prompts, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(SpecCompileError, match="got a list of token ids"):
        engine.generate_batch([1, 2, 3])
    with pytest.raises(SpecCompileError, match="pass a list of prompts"):
        engine.generate_batch("hello")
    with pytest.raises(SpecCompileError, match="request does not fit"):
        engine.generate_batch([[5] * 10, [5] * 90], max_new_tokens=8)
    assert engine.generate_batch([]) == []
    with pytest.raises(SpecCompileError, match="--max-batch 0: must be at least 1"):
        _build(tmp_path / "zero", tiny_dir, "chain-0", None, max_batch=0)
    assert compile_main([str(tiny_dir), "--tree", "chain-0", "--out", str(tmp_path / "e"),
                         "--max-batch", "0", "--backend", "eager"]) == 2
    assert compile_main([str(tiny_dir), "--tree", "chain-0", "--out", str(tmp_path / "e"),
                         "--jobs", "0", "--backend", "eager"]) == 2
    assert not (tmp_path / "e").exists()


def test_spec_run_prompts_file(engines, tmp_path, capsys):
    """spec-run --prompts-file --json: one object per line in input order (per-line knobs over
    the flags' defaults; --seed S gives line i the seed S + i), then the summary line."""
    from spec_compiler.cli import run_main

    prompts = _prompts()
    lines = [{"prompt_ids": prompts[0], "max_new_tokens": 10}, {"prompt_ids": prompts[1]},
             {"prompt_ids": prompts[2], "temperature": 1.0, "seed": 3},
             {"prompt_ids": prompts[4], "temperature": 0.5, "top_k": 5}]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(d) for d in lines) + "\n\n")
    d = engines["chain-2"]
    assert run_main([str(d), "--prompts-file", str(f), "--max-new-tokens", "7", "--seed", "100",
                     "--json"]) == 0
    out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    engine = Engine.load(d)
    expected = [engine.generate(prompts[0], max_new_tokens=10),
                engine.generate(prompts[1], max_new_tokens=7),
                engine.generate(prompts[2], max_new_tokens=7, temperature=1.0, seed=3),
                engine.generate(prompts[4], max_new_tokens=7, temperature=0.5, top_k=5, seed=103)]
    assert len(out) == 5 and list(out[-1]) == ["summary"]
    for o, e in zip(out, expected):
        assert o["output_ids"] == e.output_ids and o["seed"] == e.seed
        assert (o["stop_reason"], o["verify_calls"], o["accept_lengths"]) == \
            (e.stop_reason, e.verify_calls, e.accept_lengths)
        assert {"tokens_per_call", "seconds", "tokens_per_second", "load_seconds"} <= set(o)
    s = out[-1]["summary"]
    assert {"sequences", "tokens", "seconds", "tokens_per_second", "tokens_per_call"} <= set(s)
    assert s["sequences"] == 4 and s["tokens"] == sum(len(e.output_ids) for e in expected)
    calls = sum(e.verify_calls for e in expected)
    assert s["tokens_per_call"] == pytest.approx(sum(sum(e.accept_lengths) for e in expected) / calls)


@pytest.mark.parametrize("text, words", [
    ('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3], "prompt": "x"}', ["prompts.jsonl:2", "exactly one of"]),
    ('{"prompt_ids": [1, 2], "temprature": 1}', ["prompts.jsonl:1", "unknown key 'temprature'"]),
    ('{"prompt_ids": [1, 2], "temperature": -1}', ["prompts.jsonl:1", "temperature -1"]),
    ('{"prompt_ids": [1, 2], "max_new_tokens": 0}', ["prompts.jsonl:1", "max_new_tokens 0"]),
    ('{"prompt_ids": []}', ["prompts.jsonl:1", "non-empty list of token ids"]),
    ('[1, 2, 3]', ["prompts.jsonl:1", "expected a JSON object"]),
    ('{"prompt_ids": [1, 2]', ["prompts.jsonl:1", "not valid JSON"]),
    ('\n\n', ["no prompts"]),
])
def test_bad_prompts_file_fails_in_one_line(engines, tmp_path, capsys, text, words):
    from spec_compiler.cli import run_main

    f = tmp_path / "prompts.jsonl"
    f.write_text(text)
    assert run_main([str(engines["chain-2"]), "--prompts-file", str(f)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_state_that_does_not_fit_fails_at_load(engines, monkeypatch):
    """The state is allocated for the largest bucket at load; where it (with the weights) does
    not fit, loading fails with one line giving the numbers. Otherwise its size is reported."""
    import spec_compiler.config

    engine = Engine.load(engines["chain-2"])
    assert engine.state_bytes == fmt.state_bytes(engine.dims) > 0
    monkeypatch.setattr(spec_compiler.config, "device_memory", lambda device: (1 << 10, "the test's memory"))
    with pytest.raises(SpecCompileError, match=r"state for 3 slots \(--max-batch 3, --max-seq-len 96: "
                       r"KV caches and per-slot buffers, 0\.\d\d GiB\) .* need more than the 0\.00 GiB "
                       r"of the test's memory; rebuild it with a smaller --max-batch"):
        Engine.load(engines["chain-2"])


def test_inductor_buckets_match_transformers(tmp_path, tiny_dir, tiny_draft_dir):
    """The one Inductor build of this file (greedy only, a short chain, --max-batch 2): the
    AOTInductor packages run on state views (a bucket's slot prefix, one slot's rows for
    prefill), and every sequence is transformers' greedy output."""
    d = _build(tmp_path / "e", tiny_dir, "chain-1", tiny_draft_dir, max_batch=2, backend="inductor",
               sampling=False, max_seq_len=128, chunk=8)
    m = json.loads((d / fmt.MANIFEST).read_text())
    assert m["buckets"] == [1, 2] and (d / "verify.b2.pt2").is_file() and (d / "draft.b2.pt2").is_file()
    engine = Engine.load(d)
    prompts = _prompts()[:5]
    res = engine.generate_batch(prompts, max_new_tokens=[30, 10, 25, 40, 7])
    for p, r, n in zip(prompts, res, [30, 10, 25, 40, 7]):
        assert r.output_ids == hf_greedy(tiny_dir, p, n), p


# ---- the tree dispatcher: a tree per bucket ----
DISPATCH = ("mc_sim_7b_63", "chain-2", "chain-0")  # buckets 1, 2, 4: bushy, a chain, plain decoding
# Slots 0 and 1 hold the long sequences, so the batch shrinks 4 -> 2 -> 1 once the rest end.
DISPATCH_NEW = (None, 40, 12, 9, 10, 8)


@pytest.fixture(scope="module")
def dispatch_engine(tmp_path_factory, model_dir, tiny_draft_dir, references):
    """--max-batch 4 with a tree per bucket, as --tree auto may choose: bucket 4 decodes plainly
    (no draft graph), bucket 2 runs chain-2, bucket 1 the bushy mc_sim_7b_63 (deeper than
    chain-2: the state is its depth + 1 wide). The oracle draft overrides only the draft's
    logits: its layers still compute the K/V that the draft's cache must hold."""
    inner = load_draft(tiny_draft_dir, load_target(model_dir))
    oracle = MultiOracleDraft(inner, references, capacity=SEQ_LEN, vocab=128,
                              rank_of=ORACLE["mc_sim_7b_63"][0], poisoned=ORACLE["mc_sim_7b_63"][1])
    return _build(tmp_path_factory.mktemp("dispatch") / "e", model_dir, "chain-0", tiny_draft_dir,
                  oracle, max_batch=4, bucket_trees=list(DISPATCH))


def _record_graphs(engine) -> list[tuple[int | None, str]]:
    """Log (the bucket of the running step or None outside one, graph name) of every graph call."""
    calls, now = [], [None]
    for graphs in engine._bucket_graphs.values():
        for name, g in list(graphs.items()):
            graphs[name] = (lambda g, name: lambda *a, **k: (calls.append((now[0], name)), g(*a, **k))[1])(g, name)
    step = engine._step

    def run(b, verify):
        now[0] = b
        try:
            step(b, verify)
        finally:
            now[0] = None
    engine._step = run
    return calls


def test_dispatcher_runs_each_buckets_tree(dispatch_engine, model_dir, references):
    """Six prompts through four slots: the batch shrinks from bucket 4 (plain decoding: verify
    alone, no draft graph) through bucket 2 (chain-2) to bucket 1 (the bushy tree), slots are
    reused for the queued prompts, and every sequence's tokens and stop reason are what it gives
    alone (bucket 1's tree throughout) and transformers' greedy tokens. Accept lengths differ
    from solo ones: they are the trees' own."""
    d = dispatch_engine
    m = json.loads((d / fmt.MANIFEST).read_text())
    assert {b: t["name"] for b, t in m["bucket_trees"].items()} == dict(zip(("1", "2", "4"), DISPATCH))
    assert m["dims"]["bucket_nodes"] == [26, 3, 1] and m["dims"]["tree_depth"] == 5 and m["dims"]["mixed"]
    assert m["graphs"]["draft"]["batch"] == 1 and set(m["graphs"]["draft"]["buckets"]) == {"2"}
    assert set(m["graphs"]["verify"]["buckets"]) == {"2", "4"} and not (d / "draft.b4.pt2").exists()
    engine = Engine.load(d)
    assert "draft" not in engine._bucket_graphs[4] and "draft" in engine._bucket_graphs[2]
    assert engine.state["acc_tokens"].shape == (4, 6)  # mc_sim_7b_63's depth 5, for every bucket
    prompts = _prompts()
    solo = [engine.generate(p, max_new_tokens=n) for p, n in zip(prompts, DISPATCH_NEW)]
    calls = _record_graphs(engine)
    catch_ups = []
    catch_up = engine._catch_up
    engine._catch_up = lambda i: (catch_ups.append(i), catch_up(i))
    batch = engine.generate_batch(prompts, max_new_tokens=list(DISPATCH_NEW))
    steps = [b for b, name in calls if name == "verify"]  # one verify per step: its bucket
    assert [b for i, b in enumerate(steps) if not i or steps[i - 1] != b] == [4, 2, 1], steps
    ran = {b: {name for at, name in calls if at == b} for b in (1, 2, 4)}
    assert ran[4] == {"verify"}, "a chain-0 bucket must run no draft graph"
    assert ran[2] == ran[1] == {"draft", "verify"}, ran
    assert catch_ups, "slots that decoded plainly then speculated: the draft must have caught up"
    for p, n, s, b in zip(prompts, DISPATCH_NEW, solo, batch):
        assert (b.output_ids, b.stop_reason) == (s.output_ids, s.stop_reason), p
        ref = references[prompts.index(p)][len(p):]
        assert b.output_ids == (hf_greedy(model_dir, p, n or 200) if b.stop_reason != "length"
                                else ref[:len(b.output_ids)])
    assert {b.stop_reason for b in batch} == {"eos", "max_new_tokens", "length"}
    assert max(max(b.accept_lengths) for b in batch) >= 3, "bucket 1 and 2 should accept drafts"


def test_draft_cache_catches_up_after_plain_steps(dispatch_engine):
    """A sequence that decodes in the plain bucket (4) and then moves to a speculative one (2,
    then 1): before its first speculative step, the draft's cache rows of the plain steps are
    stale; the catch-up writes them, so they then equal those of the same sequence decoded alone
    (speculative throughout), and it still emits exactly its greedy tokens."""
    engine = Engine.load(dispatch_engine)
    prompts = _prompts()
    solo = engine.generate(prompts[2], max_new_tokens=40)
    ref = {k: v[0].clone() for k, v in engine.state.items() if k.startswith("draft.")}
    st, gaps = engine.state, []
    catch_up = engine._catch_up

    def checked(i):
        g0, g1 = int(st["draft_len"][i]), int(st["cache_len"][i] - st["n_acc"][i])
        if i == 0:
            gaps.append((g0, g1))
            assert g1 - g0 >= 2 and not all(
                torch.allclose(st[k][0, :, g0:g1], ref[k][:, g0:g1], atol=1e-4) for k in ref)
        catch_up(i)
        if i == 0:
            for k, v in ref.items():
                assert torch.allclose(st[k][0, :, :g1], v[:, :g1], atol=1e-4, rtol=1e-4), k
    engine._catch_up = checked
    with engine.session():
        engine._free_all()
        assert engine.admit(prompts[2], max_new_tokens=40) == 0  # the long one, in slot 0
        for p, n in ((prompts[1], 6), (prompts[3], 3), (prompts[5], 9)):
            engine.admit(p, max_new_tokens=n)
        res = {}
        while engine.running():
            engine.step()
            res.update(engine.finished())
    assert gaps, "slot 0 should have decoded plainly, then caught up"
    assert res[0].output_ids == solo.output_ids
