"""spec-corpus on a tiny random Llama (CPU, seconds): the token ids read back are the target's
continuations, parts respect --part-mb and verify against the index, a rerun is a no-op, an
interrupted run (time limit, crash between a part and the index) finishes byte-identical to a
straight run, and bad parts or a mismatched rerun are one-line errors that change nothing."""

from __future__ import annotations

import hashlib
import json

import pytest

from spec_compiler.errors import SpecCompileError
from spec_compiler.loading import load_target
from spec_compiler.train import corpus as corpus_mod
from spec_compiler.train.corpus import main, read_corpus, read_index
from spec_compiler.train.data import read_prompts
from spec_compiler.train.generate import continue_prompts
from test_train import prompt_file  # noqa: F401  (fixture)

GEN = ["--max-new-tokens", "12", "--gen-batch", "4"]


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _expected(model_dir, prompt_path, passes=1, batch=4, max_new=12):
    """The corpus spelled out: every pass, prompts length-sorted, `batch` at a time, greedy."""
    target = load_target(model_dir)
    ids = [r["input_ids"] for r in read_prompts(prompt_path)]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = []
    for _ in range(passes):
        for r in range(0, len(order), batch):
            pids = order[r:r + batch]
            seqs = continue_prompts(target, [ids[i] for i in pids], max_new, target.cfg.eos_token_ids)
            out += [(i, s.tokens.tolist(), s.prompt_len, s.ended) for i, s in zip(pids, seqs)]
    return out


@pytest.mark.parametrize("part_mb, layout", [(0.0002, "split"), (0.0012, "packed")])
def test_round_trip_parts_and_rerun_is_a_noop(tiny_dir, prompt_file, tmp_path, capsys, part_mb, layout):  # noqa: F811
    out = tmp_path / "c"
    argv = [str(tiny_dir), "--out", str(out), "--prompts", str(prompt_file), *GEN, "--passes", "2",
            "--part-mb", str(part_mb)]
    assert main(argv) == 0
    index = read_index(out)
    limit = int(part_mb * (1 << 20))
    parts = index["parts"]
    assert len(parts) > 1 and index["complete"] and index["batches_done"] == 2 * 6
    for p in parts:  # every part under the limit, its hash and size as recorded
        data = (out / p["file"]).read_bytes()
        assert len(data) == p["bytes"] <= limit
        assert hashlib.sha256(data).hexdigest() == p["sha256"]
    batches = [tuple(p["batches"]) for p in parts]
    if layout == "split":  # a batch too big for one part spans several
        assert len(set(batches)) < len(batches)
    else:  # small batches share a part
        assert any(a < b for a, b in batches)
    assert sorted(f for f in _files(out)) == sorted([p["file"] for p in parts] + ["index.json"])

    got = [(s.prompt_index, s.tokens.tolist(), s.prompt_len, s.ended) for s in read_corpus(out)]
    assert got == _expected(tiny_dir, prompt_file, passes=2)
    assert index["totals"]["n_sequences"] == len(got) == 48
    assert index["totals"]["n_new"] == sum(len(t) - p for _, t, p, _ in got)
    assert index["token_bytes"] == 2 and index["settings"]["passes"] == 2
    assert index["prompts"]["path"] == prompt_file.name and index["model"]["dir"] == tiny_dir.name

    before = _files(out)
    capsys.readouterr()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert _files(out) == before


def test_interrupted_runs_finish_byte_identical(tiny_dir, prompt_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Stopped by --time-limit after every batch, and killed once between a part write and the
    index (the newest part then holds a batch the index does not): the finished corpus has the
    same bytes as one straight run. Sampled passes too (seeded per batch)."""
    common = [str(tiny_dir), "--prompts", str(prompt_file), *GEN, "--passes", "2", "--temperature", "0,1",
              "--part-mb", "0.0012"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0

    real = corpus_mod._write_index
    calls = []

    def crash(out, index):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the batch's parts are written, the index not
        real(out, index)

    monkeypatch.setattr(corpus_mod, "_write_index", crash)
    assert main([*common, "--out", str(split)]) == 130
    monkeypatch.undo()
    index = read_index(split)
    assert index["batches_done"] == 2
    newest = index["parts"][-1]  # batch 2 was appended to it, past its recorded end
    assert (split / newest["file"]).stat().st_size > newest["bytes"]
    runs = 0
    while not read_index(split)["complete"]:
        capsys.readouterr()
        assert main([*common, "--out", str(split), "--time-limit", "0.001"]) == 0
        err = capsys.readouterr().err
        runs += 1
        if not read_index(split)["complete"]:
            assert "rerun the same command to continue" in err
    assert runs == 10  # one batch per run

    a, b = _files(straight), _files(split)
    assert a.keys() == b.keys()
    for name in a:
        if name != "index.json":
            assert a[name] == b[name], name
    ia, ib = (json.loads(x["index.json"]) for x in (a, b))
    assert [r["batches"] for r in ib["runs"]] == [[0, 1]] + [[k, k] for k in range(2, 12)]
    assert ib["runs"][0]["device"] == "cpu" and "--time-limit" in ib["runs"][-1]["command"]
    for i in (ia, ib):
        del i["time"], i["runs"]
    assert ia == ib
    assert len({tuple(p["batches"]) for p in ia["parts"]}) > 1


def test_part_checks_and_mismatched_reruns(tiny_dir, tiny_dirs, prompt_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "c"
    argv = [str(tiny_dir), "--out", str(out), "--prompts", str(prompt_file), *GEN, "--part-mb", "0.0004"]
    assert main(argv) == 0
    before = _files(out)
    capsys.readouterr()

    # another model, other prompts, other settings: one line, nothing written
    assert "MODEL_DIR" in _one_error(capsys, [str(tiny_dirs["mha_tied"]), *argv[1:]])
    other = tmp_path / "other.jsonl"
    other.write_text(prompt_file.read_text().replace('"id": 0,', '"id": 100,'))
    assert "--prompts" in _one_error(capsys, [*argv, "--prompts", str(other)])
    assert "--max-new-tokens 12" in _one_error(capsys, [*argv, "--max-new-tokens", "13"])
    assert "--temperature 0.0" in _one_error(capsys, [*argv, "--temperature", "0.5"])
    assert "--part-mb" in _one_error(capsys, [*argv, "--part-mb", "15"])
    assert "--seed" in _one_error(capsys, [*argv, "--seed", "1"])
    assert _files(out) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no lock or temporary left

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x").write_text("x")
    assert "not empty" in _one_error(capsys, [*argv[:2], str(junk), *argv[3:]])

    # a corrupt part, then a missing one: one line from the reader, the rerun and spec-train
    name = read_index(out)["parts"][1]["file"]
    data = bytearray(before[name])
    data[len(data) // 2] ^= 1
    (out / name).write_bytes(bytes(data))
    with pytest.raises(SpecCompileError, match=f"{name} is corrupt"):
        read_corpus(out)
    assert f"{name} is corrupt" in _one_error(capsys, argv)
    from spec_compiler.train.cli import main as train_main

    assert train_main([str(tiny_dir), "--out", str(tmp_path / "d"), "--corpus", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{name} is corrupt" in err and "\n" not in err
    (out / name).unlink()
    with pytest.raises(SpecCompileError, match=f"{name} is missing"):
        read_corpus(out)
    assert f"{name} is missing" in _one_error(capsys, argv)
    with pytest.raises(SpecCompileError, match="index.json is missing"):
        read_corpus(tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["parts"][0]["file"] = "../" + index["parts"][0]["file"]  # an index names only its own parts
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(SpecCompileError, match="is not a spec-corpus/1 index"):
        read_corpus(out)


def test_more_passes_extend_a_corpus(tiny_dir, prompt_file, tmp_path, capsys):  # noqa: F811
    """--passes may grow on a rerun: the corpus then equals one made with that many passes; it
    never shrinks."""
    common = [str(tiny_dir), "--prompts", str(prompt_file), *GEN, "--temperature", "0,1", "--part-mb", "0.0012"]
    grown, straight = tmp_path / "grown", tmp_path / "straight"
    assert main([*common, "--out", str(grown)]) == 0
    one = read_index(grown)
    assert one["complete"] and one["batches_done"] == 6
    assert main([*common, "--out", str(grown), "--passes", "2"]) == 0
    assert main([*common, "--out", str(straight), "--passes", "2"]) == 0
    a, b = _files(grown), _files(straight)
    assert a.keys() == b.keys() and all(a[n] == b[n] for n in a if n != "index.json")
    assert read_index(grown)["totals"] == read_index(straight)["totals"]
    assert read_index(grown)["totals"]["n_sequences"] == 2 * one["totals"]["n_sequences"]
    capsys.readouterr()
    assert "--passes 1" in _one_error(capsys, [*common, "--out", str(grown), "--passes", "1"])
    assert _files(grown) == a


def test_frames_round_trip_wide_ids_and_reject_garbage():
    """Token ids past 16 bits take 4 bytes; a frame decodes to the sequences it encoded, and a
    damaged one is an error, never wrong ids."""
    import torch

    from spec_compiler.train.corpus import decode_frames, encode_frame, token_bytes
    from spec_compiler.train.generate import Sequence

    assert token_bytes(1 << 16) == 2 and token_bytes((1 << 16) + 1) == 4
    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, 150_000, (n,), generator=g), None, p, e, i)
            for i, (n, p, e) in enumerate([(5, 2, True), (9, 9, False), (1, 1, False)])]
    data = encode_frame(seqs, 7, 4) + encode_frame(seqs[:1], 8, 4)
    (b0, got), (b1, again) = decode_frames(data, "x")
    assert (b0, b1) == (7, 8) and len(again) == 1
    for s, t in zip(seqs, got):
        assert (t.tokens.tolist(), t.prompt_len, t.ended, t.prompt_index) == \
            (s.tokens.tolist(), s.prompt_len, s.ended, s.prompt_index)
    for bad in (data[:-3], data[:20] + b"\0" + data[21:], b"XXXX" + data[4:]):
        with pytest.raises(SpecCompileError, match="x: not a corpus part"):
            decode_frames(bad, "x")


def test_pass_temperatures_never_repeat_a_greedy_pass(tiny_dir, prompt_file, tmp_path, capsys):  # noqa: F811
    """The list in order, then its sampling temperatures in turn: one greedy pass, not copies of
    it. Greedy only: cycles as given, with a note naming the copies."""
    from spec_compiler.train.corpus import pass_temperature

    assert [pass_temperature((0.0, 0.7, 1.0), p) for p in range(7)] == [0.0, 0.7, 1.0, 0.7, 1.0, 0.7, 1.0]
    assert [pass_temperature((0.7, 0.0), p) for p in range(4)] == [0.7, 0.0, 0.7, 0.7]
    assert [pass_temperature((0.0,), p) for p in range(3)] == [0.0, 0.0, 0.0]
    capsys.readouterr()
    assert main([str(tiny_dir), "--out", str(tmp_path / "c"), "--prompts", str(prompt_file), *GEN,
                 "--passes", "3"]) == 0
    assert "note: passes 1, 2 are greedy again" in capsys.readouterr().err


def test_shards_merge_into_the_unsharded_corpus(tiny_dir, prompt_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Two shards (one GPU each: batches k % 2 == I, seeded per batch like an unsharded run) merge
    into the corpus one straight run makes: the same part bytes and index. Shards that stopped at
    different points merge to the batches both reached, and the result continues unsharded to
    the same corpus again. A wrong shard set or shard flag is a one-line error."""
    from spec_compiler.train.corpus import merge_shards

    common = [str(tiny_dir), "--prompts", str(prompt_file), *GEN, "--passes", "2", "--temperature", "0,1",
              "--part-mb", "0.0012"]
    straight, s0, s1 = tmp_path / "straight", tmp_path / "s0", tmp_path / "s1"
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--out", str(s0), "--shard", "0/2"]) == 0
    assert main([*common, "--out", str(s1), "--shard", "1/2", "--time-limit", "0.001"]) == 0  # one batch
    i0, i1 = read_index(s0), read_index(s1)
    assert i0["complete"] and i0["batches_done"] == 11 and i0["settings"]["shard"] == [0, 2]
    assert not i1["complete"] and i1["batches_done"] == 2
    assert {b for p in i0["parts"] for b in p["batches"]} <= set(range(0, 12, 2))

    # shard 1 made only batch 1: the merge holds batches 0-2 (the first missing is 3)
    part = tmp_path / "part"
    capsys.readouterr()
    assert main(["merge", str(s0), str(s1), "--out", str(part)]) == 0
    err = capsys.readouterr().err
    assert "batches 0-2 of 12" in err and "note: 4 batches past batch 2" in err
    ip = read_index(part)
    assert ip["batches_done"] == 3 and not ip["complete"] and "shard" not in ip["settings"]
    assert main([*common, "--out", str(part)]) == 0  # continued unsharded
    a, b = _files(straight), _files(part)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "index.json")

    # shard 1 finished: the merge is the straight corpus, bytes and index
    assert main([*common, "--out", str(s1), "--shard", "1/2"]) == 0
    assert read_index(s1)["complete"]
    full = tmp_path / "full"
    index = merge_shards([s1, s0], full)  # any order
    c = _files(full)
    assert a.keys() == c.keys() and all(a[k] == c[k] for k in a if k != "index.json")
    ia = json.loads(a["index.json"])
    assert [r["shard"] for r in index["runs"]] == [1, 1, 0] and index["complete"]
    for i in (ia, index):
        del i["time"], i["runs"]
    assert list(ia) == list(index) and ia == index
    assert [(s.prompt_index, s.tokens.tolist()) for s in read_corpus(full)] == \
        [(s.prompt_index, s.tokens.tolist()) for s in read_corpus(straight)]

    # an interrupted merge leaves nothing behind
    def crash(out, index):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_mod, "_write_index", crash)
    assert main(["merge", str(s0), str(s1), "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert not (tmp_path / "cut").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())

    # errors: one line each, nothing written
    capsys.readouterr()
    assert "pass every shard's directory once" in _one_error(capsys, ["merge", str(s0), "--out", str(tmp_path / "x")])
    assert "pass every shard's directory once" in _one_error(capsys, ["merge", str(s0), str(s0), "--out",
                                                                      str(tmp_path / "x")])
    assert "pass every shard's directory once" in _one_error(capsys, ["merge", str(straight), str(s1), "--out",
                                                                      str(tmp_path / "x")])
    assert "not an empty directory" in _one_error(capsys, ["merge", str(s0), str(s1), "--out", str(full)])
    other = tmp_path / "o1"
    assert main([*common, "--out", str(other), "--shard", "1/2", "--seed", "3", "--time-limit", "0.001"]) == 0
    capsys.readouterr()
    assert "in --seed (another" in _one_error(capsys, ["merge", str(s0), str(other), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    before = _files(s1)
    assert "--shard 1/2" in _one_error(capsys, [*common, "--out", str(s1), "--shard", "0/2"])
    assert "--shard 1/2" in _one_error(capsys, [*common, "--out", str(s1)])
    assert "(none: an unsharded corpus)" in _one_error(capsys, [*common, "--out", str(straight), "--shard", "0/2"])
    assert _files(s1) == before
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "y"), "--shard", "2/2"])
    assert "0 <= I < N" in capsys.readouterr().err
    assert "use at most 12 shards" in _one_error(capsys, [*common, "--out", str(tmp_path / "z"), "--shard", "12/13"])
