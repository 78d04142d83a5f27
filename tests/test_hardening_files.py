"""Files under real faults and hostile inputs: the output lock of a compile (a second compile to
the same --out fails at once; temp dirs of killed compiles are removed; what a failed compile
created is removed; SIGHUP cleans up like SIGTERM), and integrity (engine files named by a
manifest are plain names inside the engine directory; checkpoint shards resolve inside
MODEL_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import build_engine
from spec_compiler import pipeline
from spec_compiler.errors import SpecCompileError
from spec_compiler.fileio import atomic_dir, output_lock
from test_cli import ENV, REPO, assert_clean_error, cli

FAST = ["--backend", "eager", "--tree", "chain-2", "--max-seq-len", "64", "--prefill-chunk", "8"]


def _leftovers(out: Path) -> list[str]:
    """Temp dirs and lock files of compiles to `out` in its parent."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.lock")))


# ---- fileio: output_lock, parents ----

def test_output_lock_is_exclusive_and_names_the_holder(tmp_path):
    d = tmp_path / "engine"
    with output_lock(d) as lock:
        assert lock == tmp_path / ".engine.lock" and lock.read_text().strip() == str(os.getpid())
        with pytest.raises(SpecCompileError, match=rf"--out {d} is being written by another process "
                                                   rf"\(pid {os.getpid()}"):
            with output_lock(d):
                pass
        assert lock.is_file()  # the failed attempt did not take or remove it
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with output_lock(d):  # free again
        pass


def test_output_lock_removes_stale_temporaries_only(tmp_path):
    d = tmp_path / "engine"
    (tmp_path / ".engine.tmp-dead1").mkdir()
    (tmp_path / ".engine.tmp-dead1" / "verify.pt2").write_text("half")
    (tmp_path / ".engine.tmp-dead2").write_text("a half-written file")
    (tmp_path / ".engine.lock").write_text("12345\n")  # a killed holder's: no flock on it
    (tmp_path / ".other.tmp-live").mkdir()
    (tmp_path / "engine2").mkdir()
    with output_lock(d):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".engine.lock", ".other.tmp-live", "engine2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-live", "engine2"]


@pytest.mark.parametrize("use", ["output_lock", "atomic_dir"])
def test_failure_removes_the_parents_it_created(tmp_path, use):
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "keep").write_text("x")
    dest = tmp_path / "pre" / "a" / "b" / "engine"
    ctx = output_lock if use == "output_lock" else atomic_dir
    with pytest.raises(KeyboardInterrupt):
        with ctx(dest):
            assert dest.parent.is_dir()
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["keep"]
    with ctx(dest):  # success keeps them
        pass
    assert (tmp_path / "pre" / "a" / "b").is_dir()


def test_failed_compile_removes_the_parents_it_created(tmp_path, tiny_dir, monkeypatch):
    def boom(*a, **k):
        raise SpecCompileError("lowering failed")

    monkeypatch.setattr(pipeline, "lower", boom)
    (tmp_path / "pre").mkdir()
    out = tmp_path / "pre" / "a" / "b" / "engine"
    with pytest.raises(SpecCompileError, match="lowering failed"):
        build_engine(out, tiny_dir, tree="chain-0", max_seq_len=64)
    assert list((tmp_path / "pre").iterdir()) == []


# ---- real compiles: signals, kill -9, two compiles ----

def _start_compile(out: Path, tiny_dir: Path, draft: Path) -> subprocess.Popen:
    """A real spec-compile in a subprocess, returned once its temp dir exists (it printed
    `[2/4]`, which comes after the output lock and atomic_dir)."""
    code = "import sys; from spec_compiler.cli import compile_main; sys.exit(compile_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_dir), "--draft", str(draft),
                             "--out", str(out), *FAST], stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=REPO)
    seen = ""
    while "[2/4]" not in seen:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            pytest.fail(f"compile ended before [2/4]: {seen}")
        seen += line
    return proc


def test_kill_9_then_compile_again(tmp_path, tiny_dir, tiny_draft_dir):
    """A compile killed with SIGKILL leaves its temp dir (nothing can run); the next compile to the
    same --out removes it and succeeds."""
    out = tmp_path / "engine"
    proc = _start_compile(out, tiny_dir, tiny_draft_dir)
    proc.kill()
    proc.communicate(timeout=60)
    assert [n for n in _leftovers(out) if ".tmp-" in n], "the killed compile had no temp dir"
    r = cli(tiny_dir, "--draft", tiny_draft_dir, "--out", out, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _leftovers(out) == [] and (out / "manifest.json").is_file()


def test_sighup_cleans_up_like_sigterm(tmp_path, tiny_dir, tiny_draft_dir):
    """SIGHUP (a closed terminal) mid-compile: `interrupted`, exit 130, and nothing left: no
    engine, no temp dir, no lock file, not even the parent directories the compile created."""
    out = tmp_path / "a" / "b" / "engine"
    proc = _start_compile(out, tiny_dir, tiny_draft_dir)
    proc.send_signal(signal.SIGHUP)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_second_compile_to_the_same_out_fails_at_once(tmp_path, tiny_dir, tiny_draft_dir):
    """Two compiles to one --out: the second exits 2 at once with one line naming the first's
    pid and leaves the first's temp dir alone; the first finishes a working engine."""
    out = tmp_path / "engine"
    first = _start_compile(out, tiny_dir, tiny_draft_dir)
    try:
        first.send_signal(signal.SIGSTOP)  # hold it mid-compile, deterministically
        tmp = _leftovers(out)
        r = cli(tiny_dir, "--draft", tiny_draft_dir, "--out", out, *FAST)
        assert_clean_error(r, f"--out {out}", "another process", f"pid {first.pid}")
        assert _leftovers(out) == tmp and any(".tmp-" in n for n in tmp)
    finally:
        first.send_signal(signal.SIGCONT)
    err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, err[-3000:]
    assert _leftovers(out) == []
    from spec_compiler.runtime import Engine

    assert len(Engine.load(out).generate([5, 6, 7], max_new_tokens=4).output_ids) == 4


# ---- integrity: engine files and checkpoint shards stay inside their directory ----

@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_dir, tiny_draft_dir):
    return build_engine(tmp_path_factory.mktemp("integrity") / "engine", tiny_dir, tree="chain-2",
                        draft_dir=tiny_draft_dir, max_seq_len=64, chunk=8)


def _resign(d: Path, edit) -> None:
    """Edit the manifest's data and sign it again, as anyone can (the fingerprint is no secret)."""
    from spec_compiler.export.manifest import Manifest, write_manifest

    data = json.loads((d / "manifest.json").read_text())
    edit(data)
    write_manifest(d, Manifest(data))


def _move_out(d: Path, name: str) -> Path:
    outside = d.parent / "outside"
    outside.mkdir(exist_ok=True)
    return Path(shutil.move(d / name, outside / name))


def _graph_file(value):
    return lambda d: _resign(d, lambda m: m["graphs"]["verify"].update(file=value(d)))


def _symlink_out(d: Path, name: str) -> None:
    (d / name).symlink_to(_move_out(d, name))


@pytest.mark.parametrize("tamper, words", [
    (_graph_file(lambda d: str(_move_out(d, "verify.pt2"))), ["graph 'verify' file", "/outside/verify.pt2"]),
    (_graph_file(lambda d: _move_out(d, "verify.pt2") and "../outside/verify.pt2"),
     ["graph 'verify' file", "'../outside/verify.pt2'"]),
    (_graph_file(lambda d: str(d / "verify.pt2")), ["graph 'verify' file", "plain file name"]),
    (lambda d: _symlink_out(d, "verify.pt2"), ["graph 'verify' file 'verify.pt2'", "link out"]),
    (lambda d: _symlink_out(d, "weights.safetensors"), ["'weights.safetensors'"]),
    (lambda d: _edit_files(d, "/etc/passwd"), ["files entry '/etc/passwd'"]),
    (lambda d: _edit_files(d, "../engine/verify.pt2"), ["files entry '../engine/verify.pt2'"]),
], ids=["absolute", "dotdot", "absolute-inside", "symlink-out", "weights-symlink-out",
        "files-absolute", "files-dotdot"])
def test_engine_files_are_plain_names_inside(tmp_path, engine_dir, tamper, words):
    from spec_compiler.runtime import Engine

    d = tmp_path / "engine"
    shutil.copytree(engine_dir, d)
    tamper(d)
    with pytest.raises(SpecCompileError) as e:
        Engine.load(d)
    assert "\n" not in str(e.value) and "spec-compile" in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def _edit_files(d: Path, name: str) -> None:
    """A `files` entry (outside the fingerprinted body: the fingerprint still matches)."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"][name] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))


def test_engine_file_outside_through_spec_run(tmp_path, engine_dir):
    d = tmp_path / "engine"
    shutil.copytree(engine_dir, d)
    _graph_file(lambda d: str(_move_out(d, "verify.pt2")))(d)
    assert_clean_error(cli(d, "--prompt-ids", "5,6,7", "--max-new-tokens", "4", entry="run_main"),
                       "graph 'verify' file", "outside/verify.pt2")


@pytest.fixture
def sharded(tmp_path, tiny_dir):
    from transformers import LlamaForCausalLM

    d = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(d, max_shard_size="50KB")
    return d


def _point_shard(d: Path, new_name) -> str:
    """Move the index's first shard out of MODEL_DIR and name it `new_name(moved_path)`."""
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    old = sorted(set(data["weight_map"].values()))[0]
    moved = _move_out(d, old)
    name = new_name(moved)
    data["weight_map"] = {k: name if v == old else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return name


@pytest.mark.parametrize("new_name", [lambda p: str(p), lambda p: f"../outside/{p.name}",
                                      lambda p: f"sub/../../outside/{p.name}"],
                         ids=["absolute", "dotdot", "nested-dotdot"])
def test_shards_resolve_inside_model_dir(sharded, new_name):
    from spec_compiler.loading import load_target

    name = _point_shard(sharded, new_name)
    with pytest.raises(SpecCompileError) as e:
        load_target(sharded)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and repr(name) in msg and "\n" not in msg, msg


def test_shard_symlinks_are_followed(sharded):
    """A shard that is a symlink in MODEL_DIR (the Hugging Face cache's layout: snapshots link
    to ../../blobs) loads from wherever it points."""
    from spec_compiler.loading import load_target

    name = _point_shard(sharded, lambda p: p.name)
    (sharded / name).symlink_to(sharded.parent / "outside" / name)
    load_target(sharded)
