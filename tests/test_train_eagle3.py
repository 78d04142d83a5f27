"""spec-train --arch eagle3: training-time test equals the engine's incremental drafting, the loss
falls, and the trained head is written in the EAGLE-3 reference format that spec-compile reads
(lossless engine), with resume continuing bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import build_engine, hf_greedy, make_tiny_checkpoint
from spec_compiler.config import Eagle3Config
from spec_compiler.loading import load_draft, load_target, read_draft_state
from spec_compiler.models.eagle3 import Eagle3Draft
from spec_compiler.train.cli import main
from spec_compiler.train.eagle3 import ttt_hidden
from test_train import ARGS, prompt_file  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("t3") / "target", num_hidden_layers=4)


def random_head(target, seed=3) -> Eagle3Draft:
    cfg = Eagle3Config(layer=dataclasses.replace(target.cfg, n_layers=1), target_hidden_size=target.cfg.hidden_size,
                       aux_layers=(0, 1, 2), has_embed=False)
    torch.manual_seed(seed)
    d = Eagle3Draft(cfg, target.cfg)
    for p in d.parameters():
        p.data.normal_(0, 0.3)
    d.embed_tokens.weight = target.embed_tokens.weight
    return d.eval()


@torch.no_grad()
def test_ttt_steps_equal_incremental_drafting(target_dir):
    """Step k at row i = the head run as the engine runs it: a catch-up over rows 0..i (fused
    features) into its KV cache, then one forward per drafted level on its own output."""
    target = load_target(target_dir)
    head = random_head(target)
    g = torch.Generator().manual_seed(0)
    T, steps, H = 9, 3, target.cfg.hidden_size
    tokens = torch.randint(0, 128, (1, T), generator=g)
    fused = torch.randn(1, T, 3 * H, generator=g)
    outs = ttt_hidden(head, tokens, fused, steps)
    for i in range(T - steps + 1):
        kv = [torch.zeros(head.cache_shape(1, T + steps)) for _ in range(2)]
        _, hid, *kv = head(tokens[:, :i + 1], fused[:, :i + 1], torch.arange(i + 1)[None], torch.tensor([0]), *kv)
        x = hid[:, -1:]
        torch.testing.assert_close(outs[0][:, i], x[:, 0], rtol=1e-4, atol=1e-4)
        for k in range(2, steps + 1):
            pos = i + k - 1
            _, x, *kv = head(tokens[:, i + k - 1:i + k], x, torch.tensor([[pos]]), torch.tensor([pos]), *kv)
            torch.testing.assert_close(outs[k - 1][:, i], x[:, 0], rtol=1e-4, atol=1e-4, msg=f"row {i} step {k}")


def test_cli_trains_a_loadable_eagle3_head_and_resumes_exactly(target_dir, prompt_file, tmp_path, capsys):  # noqa: F811
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [str(target_dir), "--prompts", str(prompt_file), "--arch", "eagle3", "--ttt-steps", "3", "--aux-layers", "3,1,2",
              "--draft-vocab", "64", *ARGS]
    assert main([*common, "--out", str(straight), "--max-steps", "8"]) == 0
    err = capsys.readouterr().err
    assert "kl" in err and "step 8" in err
    assert main([*common, "--out", str(split), "--max-steps", "4", "--save-every", "100"]) == 0
    assert main([*common, "--out", str(split), "--max-steps", "8", "--resume"]) == 0
    a, b = read_draft_state(straight), read_draft_state(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    H = 64
    assert a["fc.weight"].shape == (H, 3 * H) and a["lm_head.weight"].shape == (64, H)
    assert a["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * H and "d2t" in a and "t2d" in a
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and cfg["draft_vocab_size"] == 64
    info = json.loads((straight / "training.json").read_text())
    assert info["draft"]["arch"] == "eagle3" and info["history"][-1]["kl_last"] >= 0
    # The reference format loads as an EAGLE-3 head and compiles into a lossless engine.
    target = load_target(target_dir)
    head = load_draft(straight, target)
    assert isinstance(head, Eagle3Draft) and head.cfg.aux_layers == (1, 2, 3)
    from spec_compiler.runtime import Engine

    eng = Engine.load(build_engine(tmp_path / "engine", target_dir, draft_dir=straight, tree="chain-3"))
    for p in ([5, 9, 33, 2, 71, 8], [7, 7, 7]):
        assert eng.generate(p, max_new_tokens=20).output_ids == hf_greedy(target_dir, p, 20)


def _fixed_batch(target_dir):
    target = load_target(target_dir)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, 12), generator=g)
    target.feature_layers = (0, 1, 2)
    with torch.no_grad():
        final, fused, _ = target.forward_parts(tokens, torch.arange(12).expand(2, 12), torch.zeros(2, dtype=torch.long),
                                               [torch.zeros(target.cache_shape(2, 12)) for _ in range(8)])
    target.feature_layers = ()
    return target, tokens, torch.cat((fused, final), -1), torch.ones(2, 11, dtype=torch.bool)


def test_ttt_loss_falls_on_a_fixed_batch(target_dir):
    from spec_compiler.train.eagle3 import ttt_loss

    target, tokens, feats, mask = _fixed_batch(target_dir)
    head = random_head(target)
    head.lm_head.weight = torch.nn.Parameter(target.lm_head.weight.detach().clone())
    head.train()
    params = [p for n, p in head.named_parameters() if not n.startswith("embed_tokens")]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(30):
        loss, m = ttt_loss(head, target.lm_head, tokens, feats, mask, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_eagle3_trains_from_a_corpus_with_validation(target_dir, prompt_file, tmp_path):  # noqa: F811
    from spec_compiler.train.corpus import main as corpus_main

    corpus = tmp_path / "c"
    assert corpus_main([str(target_dir), "--out", str(corpus), "--prompts", str(prompt_file),
                        "--max-new-tokens", "12", "--gen-batch", "8"]) == 0
    out = tmp_path / "d"
    assert main([str(target_dir), "--out", str(out), "--corpus", str(corpus), "--arch", "eagle3",
                 "--aux-layers", "0,1,2", "--gen-batch", "8", "--batch-size", "3", "--val-frac", "0.25",
                 "--val-every", "2", "--max-steps", "4"]) == 0
    info = json.loads((out / "training.json").read_text())
    hist = info["validation"]["history"]
    assert [h["step"] for h in hist] == [2, 4]
    assert all(h["kl_last"] > 0 for h in hist)
    assert isinstance(load_draft(out, load_target(target_dir)), Eagle3Draft)


def test_ttt_loss_over_a_hot_vocabulary(target_dir):
    """A head whose lm_head scores only hot ids: with every id hot (in another order) the loss
    and metrics are the full-vocabulary ones; with a subset, each step's KL is the target's
    distribution renormalised over the hot ids, against the head's, averaged over the rows whose
    target top token is hot (written out here by hand), and acc compares target ids."""
    from spec_compiler.train.eagle3 import ttt_loss

    target, tokens, feats, mask = _fixed_batch(target_dir)
    head = random_head(target)
    head.lm_head.weight = torch.nn.Parameter(target.lm_head.weight.detach().clone())
    V = target.cfg.vocab_size
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(2))
    full, m_full = ttt_loss(head, target.lm_head, tokens, feats, mask, 3)
    permuted = random_head(target)
    permuted.lm_head.weight = torch.nn.Parameter(head.lm_head.weight.detach()[perm].clone())
    permuted.load_state_dict({k: v for k, v in head.state_dict().items() if k != "lm_head.weight"}, strict=False)
    same, m_same = ttt_loss(permuted, target.lm_head, tokens, feats, mask, 3, perm)
    torch.testing.assert_close(same, full, rtol=1e-5, atol=1e-6)
    assert m_same["acc"] == m_full["acc"] and m_same["acc_last"] == m_full["acc_last"]

    hot = perm[:40]
    sub = random_head(target)
    sub.load_state_dict({k: v for k, v in head.state_dict().items() if k != "lm_head.weight"}, strict=False)
    sub.lm_head.weight = torch.nn.Parameter(head.lm_head.weight.detach()[hot].clone())
    loss, m = ttt_loss(sub, target.lm_head, tokens, feats, mask, 2, hot)
    outs = ttt_hidden(sub, tokens[:, 1:], feats[:, :-1, :sub.fc.in_features], 2)
    final = feats[..., sub.fc.in_features:]
    want, accs = [], []
    for k, g in enumerate(outs, start=1):
        rows = [(b, i) for b in range(2) for i in range(11) if i + k < 12]
        kls, hits = [], []
        for b, i in rows:
            t = target.lm_head(final[b, i + k]).float()
            d = torch.log_softmax(sub.lm_head(sub.norm(g[b, i])).float(), -1)
            hits.append(int(hot[d.argmax()]) == int(t.argmax()))
            if bool((hot == t.argmax()).any()):
                p = torch.log_softmax(t[hot], -1)
                kls.append((p.exp() * (p - d)).sum())
        want.append(torch.stack(kls).mean())
        accs.append(sum(hits) / len(hits))
    expect = (want[0] + 0.8 * want[1]) / 1.8
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-5)
    assert abs(m["acc"] - accs[0]) < 1e-6 and abs(m["acc_last"] - accs[1]) < 1e-6


def test_eagle3_corpus_training_over_the_hot_vocabulary(target_dir, prompt_file, tmp_path):  # noqa: F811
    """With a corpus the hot vocabulary is known up front: the head trains an lm_head of N rows
    (the checkpoint holds N rows, not the vocabulary), the ids are the corpus's most frequent
    new tokens, a resume with another --draft-vocab is one clear line, and the written head
    (its rows as trained, with d2t/t2d) compiles into a lossless engine."""
    from spec_compiler.errors import SpecCompileError  # noqa: F401
    from spec_compiler.train.checkpoint import load_latest
    from spec_compiler.train.corpus import main as corpus_main, read_corpus
    from spec_compiler.train.loop import hot_ids

    corpus = tmp_path / "c"
    assert corpus_main([str(target_dir), "--out", str(corpus), "--prompts", str(prompt_file),
                        "--max-new-tokens", "12", "--gen-batch", "8"]) == 0
    out = tmp_path / "d"
    args = [str(target_dir), "--out", str(out), "--corpus", str(corpus), "--arch", "eagle3",
            "--aux-layers", "0,1,2", "--gen-batch", "8", "--batch-size", "3", "--val-frac", "0",
            "--draft-vocab", "48", "--save-every", "2"]
    assert main(args + ["--max-steps", "2"]) == 0
    _, ck = load_latest(out / "checkpoints")
    assert ck["draft"]["lm_head.weight"].shape == (48, 64)
    assert main(args + ["--max-steps", "3", "--resume"]) == 0
    r = main([*args[:-4], "--draft-vocab", "40", "--save-every", "2", "--max-steps", "4", "--resume"])
    assert r == 2
    state = read_draft_state(out)
    seqs = read_corpus(corpus)
    counts = torch.bincount(torch.cat([s.tokens[s.prompt_len:] for s in seqs]), minlength=128)
    hot = hot_ids(counts, 48)
    assert state["lm_head.weight"].shape == (48, 64)
    assert torch.equal(state["d2t"] + torch.arange(48), hot)
    head = load_draft(out, load_target(target_dir))
    assert torch.equal(head.hot_ids, hot)
    eng = build_engine(tmp_path / "e", target_dir, tree="chain-2", draft_dir=out, max_seq_len=64)
    from spec_compiler.runtime import Engine

    for p in ([5, 9, 33, 2], [7] * 6):
        assert Engine.load(eng).generate(p, max_new_tokens=16).output_ids == hf_greedy(target_dir, p, 16)


def test_init_from_continues_a_finished_head(target_dir, prompt_file, tmp_path, capsys):  # noqa: F811
    """--init-from: a new run starts from a finished head's weights (its lm_head rows matched to
    this run's hot ids), so a run that cannot move them (a vanishing learning rate) writes the
    same head back; training.json records where it started; a head that does not fit, or a
    resume from another start, is one clear line."""
    from spec_compiler.train.corpus import main as corpus_main
    from spec_compiler.tree_choice import draft_weights_sha256

    corpus = tmp_path / "c"
    assert corpus_main([str(target_dir), "--out", str(corpus), "--prompts", str(prompt_file),
                        "--max-new-tokens", "12", "--gen-batch", "8"]) == 0
    args = [str(target_dir), "--corpus", str(corpus), "--arch", "eagle3", "--aux-layers", "0,1,2",
            "--gen-batch", "8", "--batch-size", "3", "--val-frac", "0", "--draft-vocab", "48",
            "--save-every", "2", "--save-dtype", "float32"]
    first = tmp_path / "first"
    assert main([*args, "--out", str(first), "--max-steps", "3"]) == 0
    again = tmp_path / "again"
    assert main([*args, "--out", str(again), "--init-from", str(first), "--max-steps", "1",
                 "--lr", "1e-30", "--warmup", "1"]) == 0
    assert "initialized from" in capsys.readouterr().err
    a, b = read_draft_state(first), read_draft_state(again)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    info = json.loads((again / "training.json").read_text())
    assert info["init_from"] == {"dir": first.name, "weights_sha256": draft_weights_sha256(first),
                                 "tokens_seen": json.loads((first / "training.json").read_text())
                                 ["final_metrics"]["tokens_seen"]}
    # trained further from there, its weights move; a resume must start from the same draft
    more = tmp_path / "more"
    assert main([*args, "--out", str(more), "--init-from", str(first), "--max-steps", "2"]) == 0
    assert not torch.equal(read_draft_state(more)["fc.weight"], a["fc.weight"])
    err = _train_error(capsys, [*args, "--out", str(more), "--max-steps", "4", "--resume"])
    assert "started from the draft first" in err and "--init-from" in err
    # what does not fit
    assert "hot vocabulary differs" in _train_error(capsys, [*args[:-4], "--draft-vocab", "40", "--out",
                                                             str(tmp_path / "x"), "--init-from", str(first)])
    assert "--aux-layers" in _train_error(capsys, [*[x if x != "0,1,2" else "1,2,3" for x in args], "--out",
                                                   str(tmp_path / "y"), "--init-from", str(first)])
    assert "EAGLE-3 draft, but this run trains EAGLE-1/2" in _train_error(
        capsys, [str(target_dir), "--corpus", str(corpus), "--gen-batch", "8", "--val-frac", "0",
                 "--out", str(tmp_path / "z"), "--init-from", str(first)])
    assert "no such draft directory" in _train_error(
        capsys, [*args, "--out", str(tmp_path / "w"), "--init-from", str(tmp_path / "none")])
    for d in ("x", "y", "z", "w"):
        assert not (tmp_path / d / "training.json").exists()


def _train_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("error: ")]
    assert len(lines) == 1 and not any("Traceback" in ln for ln in err), err
    return lines[0]
