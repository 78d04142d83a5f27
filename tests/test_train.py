"""spec-train on tiny random Llamas (CPU, seconds): the training forward is EagleDraft.forward,
generation matches transformers' greedy output and a full forward's features, the loss falls,
the written draft loads, resume continues bit-for-bit, bad input exits 2 with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import hf_greedy
from spec_compiler.hashing import record_path, sha256_file
from spec_compiler.loading import load_draft, load_target, read_draft_state
from spec_compiler.train.cli import main
from spec_compiler.train.data import DEFAULT_TRAIN_PROMPTS, batch_prompt_ids
from spec_compiler.train.distill import collate, distill_loss, draft_hidden
from spec_compiler.train.evaluate import chain_acceptance
from spec_compiler.train.generate import continue_prompts, generate
from spec_compiler.train.loop import build_draft, hot_ids, trainable
from spec_compiler.train.options import command_line
from spec_compiler.train.save import save_draft


def _randomize(draft, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable(draft).values():
            p.normal_(0, 0.3)
    return draft


def _prompts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(1, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n"
                            for i, p in enumerate(_prompts(24))))
    return path


@pytest.mark.parametrize("n_layers", [1, 2])
def test_draft_hidden_is_eagle_forward_block_and_incremental(tiny_dirs, n_layers):
    target = load_target(tiny_dirs["llama3_rope"])
    draft = build_draft(target, n_layers, seed=0).eval()  # PyTorch default init
    B, T, H = 2, 9, target.cfg.hidden_size
    tokens, feats = torch.randint(0, 128, (B, T)), torch.randn(B, T, H)
    with torch.no_grad():
        g = draft_hidden(draft, tokens, feats)
        kv = [torch.zeros(draft.cache_shape(B, T)) for _ in range(2 * n_layers)]
        logits, out, *_ = draft(tokens, feats, torch.arange(T).expand(B, T),
                                torch.zeros(B, dtype=torch.long), *kv)
        torch.testing.assert_close(g, out, rtol=0, atol=0)
        torch.testing.assert_close(draft.lm_head(g).float(), logits, rtol=0, atol=0)
        kv = [torch.zeros(draft.cache_shape(B, T)) for _ in range(2 * n_layers)]
        for t in range(T):  # the engine's use: one pair at a time through the cache
            pos = torch.full((B,), t)
            lt, gt, *kv = draft(tokens[:, t:t + 1], feats[:, t:t + 1], pos[:, None], pos, *kv)
            torch.testing.assert_close(gt[:, 0], g[:, t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lt[:, 0], logits[:, t], rtol=1e-5, atol=1e-5)


def test_generate_matches_hf_greedy_and_full_forward(tiny_dir):
    target = load_target(tiny_dir)
    prompts = _prompts(5)
    free = generate(target, prompts, 10, eos_ids=())
    stop = free[1].tokens[free[1].prompt_len + 3].item()  # a token row 1 emits: force an EOS
    seqs = generate(target, prompts, 10, eos_ids=(stop,), grow=3, prefill_rows=2)
    assert any(s.ended for s in seqs)
    for p, s in zip(prompts, seqs):
        ref = hf_greedy(tiny_dir, p, 10, eos=[stop])
        ref = ref[:ref.index(stop) + 1] if stop in ref else ref
        assert s.tokens[:len(p)].tolist() == p and s.tokens[len(p):].tolist() == ref
        L = len(s.tokens)
        kv = [torch.zeros(target.cache_shape(1, L)) for _ in range(2 * target.cfg.n_layers)]
        with torch.no_grad():
            _, hidden, *_ = target(s.tokens[None], torch.arange(L)[None],
                                   torch.zeros(1, dtype=torch.long), *kv)
        n = L - 1 if s.ended else L  # the EOS token is never fed: its feature row is zero
        torch.testing.assert_close(s.features[:n], hidden[0, :n], rtol=1e-4, atol=1e-4)
        assert not s.features[n:].any()


def test_dropping_finished_rows_changes_nothing(tiny_dir):
    """Rows leave the batch only at host syncs; how often must not change any token."""
    target = load_target(tiny_dir)
    prompts = _prompts(6, seed=2)
    free = continue_prompts(target, prompts, 12, eos_ids=())
    eos = (free[0].tokens[free[0].prompt_len + 2].item(), free[3].tokens[free[3].prompt_len + 7].item())
    runs = [continue_prompts(target, prompts, 12, eos_ids=eos, sync_every=k) for k in (1, 3, 50)]
    assert sum(s.ended for s in runs[0]) >= 2
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.tokens.tolist() == b.tokens.tolist() and a.ended == b.ended
    for s in runs[0]:  # an ended row stops at its first EOS, and only there
        new = s.tokens[s.prompt_len:].tolist()
        assert s.ended == any(t in eos for t in new)
        assert not any(t in eos for t in new[:-1])


def test_sampling_is_seeded_and_tends_to_greedy(tiny_dir):
    target = load_target(tiny_dir)
    prompts = _prompts(4, seed=5)

    def run(t, seed):
        seqs = continue_prompts(target, prompts, 10, (), t, torch.Generator().manual_seed(seed))
        return [s.tokens.tolist() for s in seqs]

    greedy = [s.tokens.tolist() for s in continue_prompts(target, prompts, 10, ())]
    assert run(1.0, 0) == run(1.0, 0)
    assert run(1.0, 0) != run(1.0, 1) and run(1.0, 0) != greedy
    assert run(1e-6, 3) == greedy  # Gumbel-max at T -> 0 is the argmax


def test_hot_ids_most_frequent_first():
    counts = torch.tensor([5, 0, 9, 5, 1, 9])
    assert hot_ids(counts, 4).tolist() == [2, 5, 0, 3]
    assert hot_ids(counts, 6).tolist() == [2, 5, 0, 3, 4, 1]


def test_loss_decreases_on_fixed_batch(tiny_dir):
    target = load_target(tiny_dir)
    target.requires_grad_(False)
    batch = collate(generate(target, _prompts(6), 16, eos_ids=()), "cpu")
    draft = build_draft(target, 1, seed=0)
    opt = torch.optim.AdamW(trainable(draft).values(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, m = distill_loss(draft, batch, 1.0, 0.1, noise=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or m
    assert m["loss"] < 0.6 * first["loss"], (first, m)
    assert m["acc"] > first["acc"]
    assert not any(p.grad is not None for p in (target.embed_tokens.weight, target.lm_head.weight))


@pytest.mark.parametrize("hot", [False, True])
def test_chain_acceptance_matches_incremental_drafting(tiny_dir, tmp_path, hot):
    target = load_target(tiny_dir)
    draft = _randomize(build_draft(target, 1, seed=0), seed=3).eval()
    seqs = generate(target, _prompts(4, seed=4), 12, eos_ids=())
    if hot:  # the same head over the few tokens the target uses: drafts must come back as ids
        seen = sorted({int(t) for q in seqs for t in q.tokens[q.prompt_len:]}, reverse=True)
        save_draft(draft, tmp_path / "hot", dtype=torch.float32, hot_ids=torch.tensor(seen))
        draft = load_draft(tmp_path / "hot", target)
        assert draft.hot_ids is not None and 0 not in seen  # column 0 is never a valid id here
    depth = 3
    res = chain_acceptance(draft, seqs, depth)
    lens = []
    for s in seqs:
        x, f, P, L = s.tokens, s.features, s.prompt_len, len(s.tokens)
        for i in range(P - 1, L - 1 - depth):  # from scratch: true pairs 0..i, then draft alone
            kv = [torch.zeros(draft.cache_shape(1, L + depth)) for _ in range(2)]
            with torch.no_grad():
                lg, g, *kv = draft(x[None, 1:i + 2], f[None, :i + 1], torch.arange(i + 1)[None],
                                   torch.zeros(1, dtype=torch.long), *kv)
                y, g, n = draft.token_ids(lg[0, -1].argmax()), g[:, -1:], 0
                for d in range(depth):
                    if y != x[i + 2 + d]:
                        break
                    n += 1
                    pos = torch.tensor([i + 1 + d])
                    lg, g, *kv = draft(y.view(1, 1), g, pos[None], pos, *kv)
                    y = draft.token_ids(lg[0, 0].argmax())
            lens.append(n)
    assert res["n_starts"] == len(lens)
    assert res["chain_accepted"][-1] == pytest.approx(sum(lens) / len(lens))
    if hot:  # a small hot set makes hits likely: the comparison is not vacuous
        assert res["top1"] > 0 and sum(lens) > 0


def test_batch_prompt_ids_walks_shuffled_epochs():
    got = [batch_prompt_ids(10, 4, k, seed=0) for k in range(5)]  # 20 prompts = 2 epochs
    flat = sum(got, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert got == [batch_prompt_ids(10, 4, k, seed=0) for k in range(5)]


ARGS = ["--max-new-tokens", "12", "--gen-batch", "8", "--batch-size", "3", "--reuse", "2",
        "--lr", "2e-3", "--warmup", "2", "--log-every", "2", "--save-dtype", "bfloat16"]


def test_cli_writes_loadable_draft_and_resumes_exactly(tiny_dir, prompt_file, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [str(tiny_dir), "--prompts", str(prompt_file), "--layers", "2", *ARGS]
    assert main([*common, "--out", str(straight), "--max-steps", "9"]) == 0
    assert main([*common, "--out", str(split), "--max-steps", "5", "--save-every", "100"]) == 0
    assert main([*common, "--out", str(split), "--max-steps", "9", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err

    info = json.loads((split / "training.json").read_text())
    assert info["final_metrics"]["step"] == 9
    assert info["command"].startswith("spec-train ") and "--max-steps 5" in info["command"]
    assert len(info["resume_commands"]) == 1 and "--resume" in info["resume_commands"][0]
    assert info["prompts"]["sha256"] == sha256_file(prompt_file)
    assert info["model"]["config_sha256"] == sha256_file(tiny_dir / "config.json")
    # Outside the repository a path is recorded by its name alone: never this machine's.
    assert info["prompts"]["path"] == prompt_file.name and info["model"]["dir"] == tiny_dir.name
    assert info["settings"]["out"] == "split" and info["settings"]["checkpoint_dir"] is None
    assert not _absolute_paths(info), _absolute_paths(info)
    assert info["settings"]["layers"] == 2 and info["history"]

    a, b = read_draft_state(straight), read_draft_state(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    H = 64
    assert a["fc.weight"].shape == (H, 2 * H) and a["fc.weight"].dtype == torch.bfloat16
    assert "fc.bias" in a and "layers.1.input_layernorm.weight" in a
    assert "layers.0.input_layernorm.weight" not in a
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in a)
    target = load_target(tiny_dir)
    draft = load_draft(straight, target)
    assert draft.cfg.n_layers == 2 and draft.lm_head.weight is target.lm_head.weight


def _absolute_paths(record) -> list[str]:
    """Strings in a JSON record holding a word that starts with `/` (an absolute path)."""
    if isinstance(record, dict):
        return [s for v in record.values() for s in _absolute_paths(v)]
    if isinstance(record, list):
        return [s for v in record for s in _absolute_paths(v)]
    return [record] if isinstance(record, str) and re.search(r"(^|[\s=])/", record) else []


REPO = Path(__file__).resolve().parents[1]


def test_record_path_and_command_line(tmp_path, monkeypatch):
    assert record_path(DEFAULT_TRAIN_PROMPTS) == "spec_compiler/data/prompts_train.jsonl"
    monkeypatch.chdir(REPO / "spec_compiler")
    assert record_path("data/prompts_dev.jsonl") == "spec_compiler/data/prompts_dev.jsonl"
    assert record_path(tmp_path / "x" / "p.jsonl") == "p.jsonl"
    monkeypatch.chdir(tmp_path)
    assert record_path("models/m") == "m"
    assert command_line("spec-train", [str(tmp_path / "m"), "--out", "d", f"--prompts={DEFAULT_TRAIN_PROMPTS}",
                                       "--lr", "1e-3"]) == \
        "spec-train m --out d --prompts=spec_compiler/data/prompts_train.jsonl --lr 1e-3"


@pytest.mark.parametrize("name", ["smollm2-eagle-wide", "smollm2-eagle-wide-eagle3"])
def test_shipped_drafts_record_repository_paths(name):
    """The shipped drafts' training.json names its prompt files and corpus relative to the
    repository, and they are the files recorded (sha256)."""
    info = json.loads((REPO / "drafts" / name / "training.json").read_text())
    assert not _absolute_paths(info), _absolute_paths(info)
    for path, sha in ((info["prompts"]["path"], info["prompts"]["sha256"]),
                      (info["dev_eval"]["prompts"], info["dev_eval"]["sha256"])):
        assert sha256_file(REPO / path) == sha, path
    # trained from a committed corpus (the prompts came with it), which is in the repository
    assert info["settings"]["prompts"] is None and info["settings"]["corpus"] == info["corpus"]["dir"]
    assert (REPO / info["corpus"]["dir"] / "index.json").is_file()


def test_interrupted_draft_write_keeps_the_previous_draft(tiny_dir, prompt_file, tmp_path, capsys,
                                                          monkeypatch):
    """Ctrl-C while the new draft is written (weights and config done, training.json not): the
    previous draft stays whole and loadable, no temporary is left, and --resume still works."""
    out = tmp_path / "d"
    common = [str(tiny_dir), "--out", str(out), "--prompts", str(prompt_file), *ARGS, "--draft-vocab", "16"]
    assert main([*common, "--max-steps", "2"]) == 0
    before = {f: (out / f).read_bytes() for f in ("model.safetensors", "config.json", "training.json")}
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())

    write_text = Path.write_text

    def interrupted(self, *a, **k):
        if self.name.startswith(("training.json", ".training.json")):
            raise KeyboardInterrupt
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", interrupted)
    assert main([*common, "--max-steps", "4", "--resume"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert {f: (out / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "model.safetensors",
                                                     "training.json"]
    assert load_draft(out, load_target(tiny_dir)).hot_ids.shape == (16,)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts + ["step-0000004.pt"]
    assert main([*common, "--max-steps", "4", "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["final_metrics"]["step"] == 4


def _one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_with_one_line(tiny_dir, prompt_file, tmp_path, capsys):
    out = ["--out", str(tmp_path / "d")]
    assert "no such directory" in _one_error(capsys, [str(tmp_path / "nope"), *out])
    assert "no such file" in _one_error(capsys, [str(tiny_dir), *out, "--prompts",
                                                 str(tmp_path / "none.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert "bad.jsonl:2" in _one_error(capsys, [str(tiny_dir), *out, "--prompts", str(bad)])
    bad.write_text('{"text": "no prompt field"}\n')
    assert "prompt" in _one_error(capsys, [str(tiny_dir), *out, "--prompts", str(bad)])
    bad.write_text('{"input_ids": [1, 2, 999]}\n')
    assert "vocab_size" in _one_error(capsys, [str(tiny_dir), *out, "--prompts", str(bad)])
    bad.write_text('{"prompt": "text needs a tokenizer"}\n')
    assert "tokenizer" in _one_error(capsys, [str(tiny_dir), *out, "--prompts", str(bad)])
    assert "--layers" in _one_error(capsys, [str(tiny_dir), *out, "--layers", "0"])
    assert "--draft-vocab" in _one_error(capsys, [str(tiny_dir), *out, "--draft-vocab", "-1"])
    assert "--time-limit" in _one_error(capsys, [str(tiny_dir), *out, "--time-limit", "0"])
    assert "--resume" in _one_error(capsys, [str(tiny_dir), *out, "--prompts", str(prompt_file),
                                             "--resume"])
    done = tmp_path / "done"
    assert main([str(tiny_dir), "--out", str(done), "--prompts", str(prompt_file), *ARGS,
                 "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert "already holds" in _one_error(capsys, [str(tiny_dir), "--out", str(done)])
    assert "--lr" in _one_error(capsys, [str(tiny_dir), "--out", str(done), "--prompts",
                                         str(prompt_file), *ARGS, "--lr", "1e-2", "--resume"])


def test_time_limit_stops_and_writes_the_draft(tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "timed"
    assert main([str(tiny_dir), "--out", str(out), "--prompts", str(prompt_file), *ARGS,
                 "--tokens", "100000000", "--time-limit", "3", "--temperature", "0,1",
                 "--draft-vocab", "16"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert 0 < info["final_metrics"]["tokens_seen"] < 100000000
    assert info["settings"]["temperature"] == [0.0, 1.0] and info["settings"]["time_limit"] == 3
    assert info["draft"]["draft_vocab"] == 16 and 0 < info["draft"]["hot_coverage"] <= 1
    target = load_target(tiny_dir)
    hot = load_draft(out, target).hot_ids  # the 16 tokens the target generated most often
    assert hot.shape == (16,) and len(set(hot.tolist())) == 16
    assert load_draft(out, target, draft_vocab="full").hot_ids is None


# ---------------------------------------------------------------- --corpus, validation, split checkpoints

@pytest.fixture(scope="module")
def corpus_dir(tiny_dir, prompt_file, tmp_path_factory):
    from spec_compiler.train.corpus import main as corpus_main

    out = tmp_path_factory.mktemp("corpus") / "c"
    assert corpus_main([str(tiny_dir), "--out", str(out), "--prompts", str(prompt_file), "--passes", "2",
                        "--temperature", "0,1", "--max-new-tokens", "12", "--gen-batch", "8",
                        "--part-mb", "0.002"]) == 0
    return out


CORPUS_ARGS = ["--gen-batch", "8", "--batch-size", "3", "--reuse", "2", "--lr", "2e-3", "--warmup", "2",
               "--log-every", "2", "--val-frac", "0.25", "--val-every", "2", "--checkpoint-part-mb", "0.1"]


def test_corpus_training_resumes_exactly_and_never_trains_on_validation_prompts(
        tiny_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    from spec_compiler.train import loop
    from spec_compiler.train.corpus import is_val_prompt, read_corpus

    drawn = []
    batch = loop._Corpus.batch

    def spy(self, *a):
        seqs = batch(self, *a)
        drawn.extend(s.prompt_index for s in seqs)
        return seqs

    monkeypatch.setattr(loop._Corpus, "batch", spy)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [str(tiny_dir), "--corpus", str(corpus_dir), *CORPUS_ARGS, "--patience", "0"]
    assert main([*common, "--out", str(straight), "--max-steps", "9"]) == 0
    capsys.readouterr()
    # one command for every call: --resume-if-any starts the first and resumes the next
    assert main([*common, "--out", str(split), "--max-steps", "5", "--save-every", "100", "--resume-if-any"]) == 0
    assert "no checkpoint yet; starting" in capsys.readouterr().err
    ckpts = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert ckpts[-1] == "step-0000005.pt.parts" and len(ckpts) > 2  # in parts under the limit
    assert all((split / "checkpoints" / n).stat().st_size <= 0.1 * (1 << 20) for n in ckpts)
    assert main([*common, "--out", str(split), "--max-steps", "9", "--save-every", "100", "--resume-if-any"]) == 0
    assert "resumed from" in capsys.readouterr().err

    a, b = read_draft_state(straight), read_draft_state(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    val_prompts = {s.prompt_index for s in read_corpus(corpus_dir) if is_val_prompt(s.prompt_index, 0.25)}
    assert val_prompts and drawn and not set(drawn) & val_prompts
    assert len(set(drawn)) > 5

    ia, ib = (json.loads((d / "training.json").read_text()) for d in (straight, split))
    va, vb = ia["validation"], ib["validation"]
    assert [v["step"] for v in va["history"]] == [2, 4, 6, 8] and va["last"]["step"] == 9
    strip = lambda v: {k: x for k, x in v.items() if k != "wall_s"}  # noqa: E731
    assert [strip(v) for v in va["history"]] == [strip(v) for v in vb["history"]]
    assert strip(va["last"]) == strip(vb["last"]) and va["written"] == vb["written"]
    assert all(v["wall_s"] >= 0 and v["tokens_seen"] > 0 and 0 <= v["acc"] <= 1 for v in vb["history"])
    assert ib["stop_reason"] == "max steps" and ib["final_metrics"]["step"] == 9
    assert [h["step"] for h in ib["history"]] == [2, 4, 5, 6, 8, 9] and all(h["wall_s"] >= 0 for h in ib["history"])
    fm = ib["final_metrics"]
    assert fm["corpus_sequences_used"] == 16 and 0 < fm["epochs"] < 1  # 9 steps of 6 per batch: 2 batches
    assert 0 < fm["corpus_tokens_used"] < ib["corpus"]["train_new"] and fm["wall_s"] > 0
    assert ib["corpus"]["train_sequences"] == 2 * (24 - len(val_prompts))
    assert ib["corpus"]["val_prompts"] == len(val_prompts) and ib["corpus"]["dir"] == corpus_dir.name
    assert ib["prompts"]["n_prompts"] == 24 and ib["settings"]["prompts"] is None
    assert len(ib["resume_commands"]) == 1 and not _absolute_paths(ib)
    # validation shapes training: a resume must keep it
    assert main([*common, "--out", str(split), "--max-steps", "10", "--resume", "--val-every", "3"]) == 2
    assert "--val-every" in capsys.readouterr().err


def test_early_stop_when_validation_cannot_improve(tiny_dir, corpus_dir, tmp_path):
    """A learning rate too small to move a float32 weight: the validation loss never falls below
    its first value, so --patience 2 stops two validations later, and the first is written."""
    out = tmp_path / "d"
    assert main([str(tiny_dir), "--corpus", str(corpus_dir), "--out", str(out), *CORPUS_ARGS, "--lr", "1e-30",
                 "--patience", "2", "--max-steps", "50", "--save-dtype", "float32", "--save-every", "2",
                 "--keep-checkpoints", "1"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["stop_reason"] == "early stop" and info["final_metrics"]["step"] == 6
    v = info["validation"]
    assert [h["step"] for h in v["history"]] == [2, 4, 6] and v["best"]["step"] == 2
    assert v["written"] == "best (step 2)" and v["last"] is None
    from spec_compiler.train.checkpoint import list_checkpoints, load_latest

    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000006.pt.parts"]
    assert {p.name.split(".")[0] for p in (out / "checkpoints").iterdir()} == {"step-0000006"}
    _, ck = load_latest(out / "checkpoints")
    written = read_draft_state(out)
    for k, w in ck["best"].items():
        torch.testing.assert_close(written[k], w, rtol=0, atol=0, msg=k)


def test_the_best_validated_weights_are_written(tiny_dir, corpus_dir, tmp_path, monkeypatch):
    """Scripted validation losses (best at step 4, then worse): training stops at step 8 and
    writes the step-4 weights, which the checkpoint keeps beside the (different) current ones."""
    from spec_compiler.train import loop
    from spec_compiler.train.checkpoint import load_latest

    losses = iter([1.0, 0.5, 0.7, 0.8])
    monkeypatch.setattr(loop, "_validate", lambda *a: {"loss": next(losses), "acc": 0.0})
    out = tmp_path / "d"
    assert main([str(tiny_dir), "--corpus", str(corpus_dir), "--out", str(out), *CORPUS_ARGS,
                 "--patience", "2", "--max-steps", "50", "--draft-vocab", "16"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["stop_reason"] == "early stop" and info["final_metrics"]["step"] == 8
    assert 0 < info["draft"]["hot_coverage"] <= 1  # counted over the corpus's training split
    assert info["validation"]["best"]["step"] == 4 and info["validation"]["written"] == "best (step 4)"
    _, ck = load_latest(out / "checkpoints")
    assert ck["state"]["step"] == 8 and ck["state"]["best"]["step"] == 4
    written = read_draft_state(out)
    assert ck["best"].keys() == {k for k in written if k in ck["draft"]}
    for k, w in ck["best"].items():
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(written[k], w, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(ck["draft"][k].to(torch.bfloat16), w) for k, w in ck["best"].items())


def test_corpus_training_errors(tiny_dir, tiny_dirs, corpus_dir, prompt_file, tmp_path, capsys):
    out = ["--out", str(tmp_path / "d")]
    err = _one_error(capsys, [str(tiny_dirs["mha_tied"]), *out, "--corpus", str(corpus_dir)])
    assert "another model" in err and "spec-corpus" in err
    assert "--prompts" in _one_error(capsys, [str(tiny_dir), *out, "--corpus", str(corpus_dir),
                                              "--prompts", str(prompt_file)])
    assert "--val-frac" in _one_error(capsys, [str(tiny_dir), *out, "--val-frac", "0.1"])
    assert "--val-frac" in _one_error(capsys, [str(tiny_dir), *out, "--corpus", str(corpus_dir),
                                               "--val-frac", "1"])
    assert "--corpus" in _one_error(capsys, [str(tiny_dir), *out, "--corpus", str(tmp_path / "none")])
    done = tmp_path / "o"
    assert main([str(tiny_dir), "--out", str(done), "--prompts", str(prompt_file), *ARGS,
                 "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert "trained online (without --corpus)" in _one_error(
        capsys, [str(tiny_dir), "--out", str(done), "--corpus", str(corpus_dir), *ARGS, "--resume"])
    # a corpus that grew since (one more pass) is other data: its checkpoint does not continue on it
    import shutil

    from spec_compiler.train.corpus import main as corpus_main

    grown = tmp_path / "grown"
    shutil.copytree(corpus_dir, grown)
    trained = [str(tiny_dir), "--out", str(tmp_path / "e"), "--corpus", str(grown), *CORPUS_ARGS]
    assert main([*trained, "--max-steps", "2"]) == 0
    assert corpus_main([str(tiny_dir), "--out", str(grown), "--prompts", str(prompt_file), "--passes", "3",
                        "--temperature", "0,1", "--max-new-tokens", "12", "--gen-batch", "8",
                        "--part-mb", "0.002"]) == 0
    capsys.readouterr()
    assert "other data, or more of it" in _one_error(capsys, [*trained, "--max-steps", "4", "--resume"])


def test_split_checkpoints_reassemble_and_old_ones_still_load(tmp_path, monkeypatch):
    from spec_compiler.errors import SpecCompileError
    from spec_compiler.train import checkpoint
    from spec_compiler.train.checkpoint import list_checkpoints, load_latest, save_checkpoint

    d = tmp_path / "ck"
    d.mkdir()

    def state(n):
        return {"w": torch.randn(3000, generator=torch.Generator().manual_seed(n)), "state": {"step": n}}

    def same(a, b):
        return torch.equal(a["w"], b["w"]) and a["state"] == b["state"]

    torch.save(state(1), d / "step-0000001.pt")  # as the single-file writer left them
    path, ck = load_latest(d)
    assert path.name == "step-0000001.pt" and same(ck, state(1))

    assert save_checkpoint(d, 2, state(2), part_bytes=4096).name == "step-0000002.pt.parts"
    parts = sorted(d.glob("step-0000002.pt.part0*"))
    assert len(parts) >= 3 and all(p.stat().st_size <= 4096 for p in parts)
    path, ck = load_latest(d)
    assert path.name == "step-0000002.pt.parts" and same(ck, state(2))
    assert save_checkpoint(d, 3, state(3), part_bytes=1 << 20).name == "step-0000003.pt"  # fits: one file
    save_checkpoint(d, 4, state(4), part_bytes=4096)
    assert [p.name for p in list_checkpoints(d)] == ["step-0000003.pt", "step-0000004.pt.parts"]
    assert not list(d.glob("step-0000002*")) and not list(d.glob("step-0000001*"))  # the newest two kept

    real, calls = checkpoint.atomic_write_bytes, []

    def interrupted(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, 5, state(5), part_bytes=4096)
    monkeypatch.undo()
    path, ck = load_latest(d)  # the unfinished one has no manifest: the previous is whole
    assert path.name == "step-0000004.pt.parts" and same(ck, state(4))
    save_checkpoint(d, 6, state(6), part_bytes=4096)
    assert not list(d.glob("step-0000005*"))  # its orphan parts are gone

    part = d / "step-0000006.pt.part001"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SpecCompileError, match="part001 is corrupt") as e:
        load_latest(d)
    assert "\n" not in str(e.value)
    part.unlink()
    with pytest.raises(SpecCompileError, match="part001 is missing"):
        load_latest(d)


def test_corpus_tokens_trains_on_nested_fixed_subsets(tiny_dir, corpus_dir, tmp_path, monkeypatch):
    """--corpus-tokens N: the first training sequences of one fixed order within N new tokens,
    whatever --seed; growing N only adds sequences (nested data-size points); only those are
    drawn, training.json records the limit, and the flag is corpus-only and kept on resume."""
    from spec_compiler.train import loop
    from spec_compiler.train.corpus import read_corpus, split_by_prompt

    train, _ = split_by_prompt([s for s in read_corpus(corpus_dir)
                                if loop.supervised_range(s)[1] > loop.supervised_range(s)[0]], 0.25)
    key = lambda s: (s.prompt_index, tuple(s.tokens.tolist()))  # noqa: E731
    sizes = [40, 90, 10**9]
    subsets = [loop.data_subset(train, n) for n in sizes]
    for n, sub in zip(sizes, subsets):
        assert sub and (len(sub) == 1 or sum(s.n_new for s in sub) <= n)
    assert {key(s) for s in subsets[0]} <= {key(s) for s in subsets[1]} < {key(s) for s in subsets[2]}
    assert len(subsets[2]) == len(train) and len(subsets[0]) < len(subsets[1])

    drawn = []
    batch = loop._Corpus.batch

    def spy(self, *a):
        seqs = batch(self, *a)
        drawn.extend(key(s) for s in seqs)
        return seqs

    monkeypatch.setattr(loop._Corpus, "batch", spy)
    out = tmp_path / "d"
    common = [str(tiny_dir), "--corpus", str(corpus_dir), *CORPUS_ARGS, "--patience", "0", "--out", str(out)]
    assert main([*common, "--corpus-tokens", "90", "--seed", "5", "--max-steps", "6"]) == 0
    assert drawn and set(drawn) <= {key(s) for s in subsets[1]}
    info = json.loads((out / "training.json").read_text())
    assert info["corpus"]["corpus_tokens"] == 90
    assert info["corpus"]["train_sequences"] == len(subsets[1])
    assert main([*common, "--corpus-tokens", "40", "--seed", "5", "--max-steps", "8", "--resume"]) == 2
    assert main([str(tiny_dir), "--out", str(tmp_path / "o"), "--corpus-tokens", "40"]) == 2  # online


def test_init_from_an_eagle1_draft(tiny_dir, prompt_file, tmp_path, capsys):
    """--init-from with an EAGLE-1 draft: a run that cannot move the weights writes them back
    unchanged; a draft with other layers is one clear line, whichever has more."""
    common = [str(tiny_dir), "--prompts", str(prompt_file), *ARGS[:-2], "--save-dtype", "float32"]
    first = tmp_path / "first"
    assert main([*common, "--layers", "2", "--out", str(first), "--max-steps", "3"]) == 0
    again = tmp_path / "again"
    assert main([*common, "--layers", "2", "--out", str(again), "--init-from", str(first),
                 "--max-steps", "1", "--lr", "1e-30", "--warmup", "1"]) == 0
    a, b = read_draft_state(first), read_draft_state(again)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert json.loads((again / "training.json").read_text())["init_from"]["dir"] == "first"
    capsys.readouterr()
    err = _one_error(capsys, [*common, "--layers", "1", "--out", str(tmp_path / "x"), "--init-from", str(first)])
    assert "layers.1." in err and "--layers" in err
    err = _one_error(capsys, [*common, "--layers", "3", "--out", str(tmp_path / "y"), "--init-from", str(first)])
    assert "layers.2." in err and "is missing" in err
