"""Bad input through the real console entry points: one `error:` line naming the problem and the
fix, exit code 2, no traceback, and no partial output left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import HOT_IDS, build_engine, copy_draft, d2t_of, hf_greedy
from spec_compiler.kernels.limits import MAX_PREFILL_CHUNK, MAX_TREE_NODES

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args, entry="compile_main", module="spec_compiler.cli", timeout=600):
    code = f"import sys; from {module} import {entry}; sys.exit({entry}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=REPO)


def assert_clean_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


# ---- spec-compile ----

@pytest.fixture
def model_copy(tmp_path, tiny_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


@pytest.mark.parametrize("break_it, words", [
    (lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    (lambda d: (d / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors"]),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     ["corrupt"]),
    (lambda d: _edit_json(d / "config.json", model_type="mistral", architectures=["MistralForCausalLM"]),
     ["Llama", "mistral"]),
    (lambda d: _edit_json(d / "config.json", intermediate_size=100), ["shape"]),
], ids=["no-config", "bad-json", "no-weights", "truncated-weights", "not-llama", "weights-mismatch"])
def test_bad_model_dir(tmp_path, model_copy, tiny_draft_dir, break_it, words):
    break_it(model_copy)
    out = tmp_path / "engine"
    r = cli(model_copy, "--draft", tiny_draft_dir, "--out", out, "--backend", "eager")
    assert_clean_error(r, *words)
    no_leftovers(out)


def _edit_json(path: Path, **kv):
    d = json.loads(path.read_text())
    d.update(kv)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("field, value, word", [("hidden_size", 32, "hidden_size"),
                                                ("vocab_size", 64, "vocab_size")])
def test_mismatched_draft(tmp_path, tiny_dir, tiny_draft_dir, field, value, word):
    draft = tmp_path / "draft"
    shutil.copytree(tiny_draft_dir, draft)
    _edit_json(draft / "config.json", **{field: value})
    out = tmp_path / "engine"
    r = cli(tiny_dir, "--draft", draft, "--out", out, "--backend", "eager")
    assert_clean_error(r, word, "draft")
    no_leftovers(out)


def test_draft_weights_missing(tmp_path, tiny_dir, tiny_draft_dir):
    draft = tmp_path / "draft"
    shutil.copytree(tiny_draft_dir, draft)
    (draft / "model.safetensors").unlink()
    r = cli(tiny_dir, "--draft", draft, "--out", tmp_path / "engine")
    assert_clean_error(r, "pytorch_model.bin")


def _d2t(ids):
    return lambda st: st.update(d2t=d2t_of(ids))


@pytest.mark.parametrize("edit, config, flags, words", [
    (_d2t(HOT_IDS[:5] + [1000] + HOT_IDS[6:]), {}, [], ["d2t", "target id 1000", "[0, 128)"]),
    (_d2t(HOT_IDS[:2] + HOT_IDS[:1] + HOT_IDS[3:]), {}, [], ["d2t", "unique"]),
    (lambda st: st.update(d2t=st["d2t"].float()), {}, [], ["d2t", "int64"]),
    (lambda st: st.update(d2t=st["d2t"][:40]), {}, [], ["draft_vocab_size=48", "40 entries"]),
    (None, {"draft_vocab_size": 47}, [], ["config.json", "draft_vocab_size=47", "48"]),
    (None, {}, ["--draft-vocab", "49"], ["--draft-vocab 49", "48 hot tokens"]),
    (None, {}, ["--draft-vocab", "many"], ["--draft-vocab 'many'", "auto, full"]),
    (None, {}, ["--draft-vocab", "-3"], ["--draft-vocab '-3'", "positive"]),
    (None, {}, ["--draft-vocab", "3"], ["--draft-vocab 3", "top-k 4"]),
], ids=["d2t-range", "d2t-duplicate", "d2t-dtype", "d2t-shape", "config-size", "n-too-large",
        "n-not-int", "n-negative", "n-below-top-k"])
def test_bad_hot_vocab_draft(tmp_path, tiny_dir, tiny_hot_draft_dir, edit, config, flags, words):
    draft = copy_draft(tiny_hot_draft_dir, tmp_path / "draft", edit, **config)
    out = tmp_path / "engine"
    r = cli(tiny_dir, "--draft", draft, "--out", out, "--backend", "eager", *flags)
    assert_clean_error(r, *words)
    no_leftovers(out)


def test_draft_vocab_needs_a_hot_list(tmp_path, tiny_dir, tiny_draft_dir):
    out = tmp_path / "engine"
    assert_clean_error(cli(tiny_dir, "--draft", tiny_draft_dir, "--out", out, "--draft-vocab", "16"),
                       "--draft-vocab 16", "no hot-token list", "full")
    assert_clean_error(cli(tiny_dir, "--tree", "chain-0", "--out", out, "--draft-vocab", "16"),
                       "--draft-vocab 16", "--draft")
    no_leftovers(out)


def test_draft_vocab_prefix_compiles(tmp_path, tiny_dir, tiny_hot_draft_dir):
    """--draft-vocab N: the engine's draft scores the first N hot ids; the manifest says N."""
    from safetensors.torch import load_file

    out = tmp_path / "engine"
    r = cli(tiny_dir, "--draft", tiny_hot_draft_dir, "--out", out, "--backend", "eager",
            "--tree", "chain-2", "--max-seq-len", "128", "--draft-vocab", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in r.stderr.strip().splitlines():  # progress lines only: no library warnings
        assert re.match(r"(\[[1-4]/4\] |done in \d+s: )", line), r.stderr
    assert json.loads((out / "manifest.json").read_text())["draft"]["draft_vocab_size"] == 20
    assert load_file(out / "weights.safetensors")["draft.hot_ids"].tolist() == HOT_IDS[:20]
    r = run(out, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output_ids"] == hf_greedy(tiny_dir, [5, 6, 7], 6)


@pytest.mark.parametrize("content, word", [("[[0], [1, 0], [2, 2]]", "prefix"), ("{{", "JSON"),
                                           ("[[0], [-1]]", "ranks")])
def test_bad_tree_file(tmp_path, tiny_dir, tiny_draft_dir, content, word):
    tree = tmp_path / "tree.json"
    tree.write_text(content)
    out = tmp_path / "engine"
    r = cli(tiny_dir, "--draft", tiny_draft_dir, "--out", out, "--tree", tree)
    assert_clean_error(r, word)
    no_leftovers(out)


def test_unknown_tree_and_missing_draft(tmp_path, tiny_dir):
    assert_clean_error(cli(tiny_dir, "--out", tmp_path / "e", "--tree", "bushy-9"), "bushy-9")
    # A drafting tree without --draft: CompileConfig's check, through the CLI.
    assert_clean_error(cli(tiny_dir, "--out", tmp_path / "e"), "--draft", "needs a draft", "chain-0")
    no_leftovers(tmp_path / "e")


def test_compile_reads_the_draft_once(tmp_path, tiny_dir, tiny_hot_draft_dir, monkeypatch):
    """spec-compile checks the draft before loading the target and hands the weights it read to
    the compile: they are read from disk once."""
    from spec_compiler import loading
    from spec_compiler.cli import compile_main

    calls, real = [], loading.read_draft_state
    monkeypatch.setattr(loading, "read_draft_state", lambda d: calls.append(d) or real(d))
    out = tmp_path / "engine"
    assert compile_main([str(tiny_dir), "--draft", str(tiny_hot_draft_dir), "--out", str(out),
                         "--backend", "eager", "--tree", "chain-2", "--max-seq-len", "64",
                         "--prefill-chunk", "8", "--draft-vocab", "20"]) == 0
    assert calls == [tiny_hot_draft_dir]
    assert json.loads((out / "manifest.json").read_text())["draft"]["draft_vocab_size"] == 20


def test_sizes_past_the_kernel_limits(tmp_path, tiny_dir, tiny_draft_dir):
    """Trees and prefill chunks the CUDA tree-attention kernels cannot take are refused up front
    (on any --device), naming the flag and the maximum; spec-fit-tree refuses to fit one."""
    out = tmp_path / "engine"
    big = tmp_path / "big.json"
    big.write_text(json.dumps([[r] for r in range(MAX_TREE_NODES)]))  # + the root
    assert_clean_error(cli(tiny_dir, "--draft", tiny_draft_dir, "--out", out, "--tree", big),
                       "--tree", f"{MAX_TREE_NODES + 1} nodes", f"at most {MAX_TREE_NODES}")
    chunk = MAX_PREFILL_CHUNK + 1
    assert_clean_error(cli(tiny_dir, "--draft", tiny_draft_dir, "--out", out, "--device", "cuda",
                           "--prefill-chunk", chunk, "--max-seq-len", 4 * chunk),
                       f"--prefill-chunk {chunk}", str(MAX_PREFILL_CHUNK))
    no_leftovers(out)
    tree_out = tmp_path / "tree.json"
    assert_clean_error(cli(tiny_dir, tiny_draft_dir, "--nodes", MAX_TREE_NODES + 1, "--out", tree_out,
                           entry="main", module="spec_compiler.train.fit_tree"),
                       f"--nodes {MAX_TREE_NODES + 1}", f"at most {MAX_TREE_NODES}")
    assert not tree_out.exists()


def test_sigint_leaves_no_engine(tmp_path, tiny_dir, tiny_draft_dir):
    """Interrupt a real compile mid-lowering: neither ENGINE_DIR nor its temp dir remain."""
    out = tmp_path / "engine"
    code = "import sys; from spec_compiler.cli import compile_main; sys.exit(compile_main(sys.argv[1:]))"
    # SIGINT at its default in the child: a test run started in the background (nohup, `&` in a
    # script) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_dir), "--draft", str(tiny_draft_dir),
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 300
    while "[3/4]" not in seen and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "[3/4]" in seen, seen
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0, seen + rest
    assert "interrupted" in rest
    no_leftovers(out)


# ---- engines: fingerprint, versions, requests ----

@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_dir, tiny_draft_dir):
    return build_engine(tmp_path_factory.mktemp("cli") / "engine", tiny_dir, tree="chain-2",
                        draft_dir=tiny_draft_dir, max_seq_len=128)


def run(*args):
    return cli(*args, entry="run_main")


def test_run_json_fields(engine_dir):
    r = run(engine_dir, "--prompt-ids", "5,6,7", "--max-new-tokens", "9", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["output_ids"]) == 9 or d["stop_reason"] == "eos"
    for k in ("output_ids", "stop_reason", "verify_calls", "tokens_per_call", "seconds", "load_seconds"):
        assert k in d
    assert d["stop_reason"] in ("eos", "max_new_tokens", "length") and 0 < d["load_seconds"] < 60


def test_run_summary_line(engine_dir):
    """Without --json: the text (here the ids, no tokenizer) on stdout, and on stderr one summary
    line and nothing else (no library warnings): load time, tokens/s, tokens per verify call."""
    r = run(engine_dir, "--prompt-ids", "5,6,7", "--max-new-tokens", "9")
    assert r.returncode == 0, r.stderr
    assert all(x.isdigit() for x in r.stdout.strip().split(","))
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert re.fullmatch(r"\[load \d+\.\d\d s \| \d+ tokens in \d+\.\d\d s: \d+\.\d tokens/s, \d\.\d\d "
                        r"tokens/call over \d+ verify calls, stop: (eos|max_new_tokens|length)\]", lines[0]), lines


def test_run_hashes_the_engine_once(engine_dir, monkeypatch, capsys):
    """spec-run checks the engine's fingerprint (every file hashed) once: reading the manifest's
    TP degree before the load does not hash it again."""
    from spec_compiler.cli import run_main
    from spec_compiler.export import manifest

    calls, real = [], manifest.digest_files
    monkeypatch.setattr(manifest, "digest_files", lambda paths: calls.append(len(paths)) or real(paths))
    assert run_main([str(engine_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "3"]) == 0
    assert len(calls) == 1 and calls[0] > 1


def test_request_that_cannot_fit(engine_dir):
    r = run(engine_dir, "--prompt-ids", ",".join(["5"] * 100), "--max-new-tokens", "50")
    assert_clean_error(r, "100", "50", "128")


def test_bad_prompt_ids(engine_dir):
    assert_clean_error(run(engine_dir, "--prompt-ids", "1,x"), "--prompt-ids")
    assert_clean_error(run(engine_dir, "--prompt-ids", "1,999"), "999")
    assert_clean_error(run(engine_dir, "--prompt", "hello"), "tokenizer")


@pytest.mark.parametrize("tamper, word", [
    (lambda d: (d / "weights.safetensors").write_bytes((d / "weights.safetensors").read_bytes()[:-1] + b"\0"),
     "weights.safetensors"),
    (lambda d: (d / "verify.pt2").write_bytes((d / "verify.pt2").read_bytes() + b"x"), "verify.pt2"),
    (lambda d: _edit_json(d / "manifest.json", schema_version=999), "schema"),
    (lambda d: _edit_json(d / "manifest.json", torch_version="1.0.0"), "torch"),
    (lambda d: _edit_json(d / "manifest.json", dtype="float16"), "fingerprint"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json"),
], ids=["weights", "artifact", "schema", "torch", "manifest-body", "no-manifest"])
def test_tampered_engine(tmp_path, engine_dir, tamper, word):
    d = tmp_path / "engine"
    shutil.copytree(engine_dir, d)
    tamper(d)
    assert_clean_error(run(d, "--prompt-ids", "5,6,7", "--max-new-tokens", "4"), word)


def test_missing_engine(tmp_path):
    assert_clean_error(run(tmp_path / "nope", "--prompt-ids", "1"), "spec-compile")


def test_out_exists(tmp_path, tiny_dir, tiny_draft_dir):
    (tmp_path / "e").mkdir()
    assert_clean_error(cli(tiny_dir, "--draft", tiny_draft_dir, "--out", tmp_path / "e"), "exists")
