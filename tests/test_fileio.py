"""fileio: atomic files and directories (an interrupted write leaves the old state and no
temporaries), read_json_object's errors, and cli_entry's exit codes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from spec_compiler import fileio
from spec_compiler.errors import SpecCompileError, cli_entry
from spec_compiler.fileio import atomic_dir, atomic_open, atomic_write_text, read_json_object


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    f = tmp_path / "a.json"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two" and _names(tmp_path) == ["a.json"]
    assert f.stat().st_mode & 0o777 == 0o666 & ~fileio._umask()
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(f) as out:
            out.write(b"half")
            raise KeyboardInterrupt
    assert f.read_text() == "two" and _names(tmp_path) == ["a.json"]


def _build(dest, existing, files, fail=False):
    with atomic_dir(dest, existing) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(f".{dest.name}.tmp-")
        for name, text in files.items():
            (tmp / name).write_text(text)
        if fail:
            raise KeyboardInterrupt


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_atomic_dir_modes(tmp_path, monkeypatch, exchange):
    if not exchange:  # a platform without RENAME_EXCHANGE
        monkeypatch.setattr(fileio.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    d = tmp_path / "d"
    _build(d, "error", {"a": "1", "b": "1"})
    assert _names(d) == ["a", "b"] and d.stat().st_mode & 0o777 == 0o777 & ~fileio._umask()
    with pytest.raises(FileExistsError):
        _build(d, "error", {"a": "2"})
    (d / "sub").mkdir()
    (d / "sub" / "x").write_text("kept")
    _build(d, "merge", {"a": "2"})  # a rewritten; b and sub/x carried over
    assert _names(d) == ["a", "b", "sub"] and (d / "a").read_text() == "2"
    assert (d / "sub" / "x").read_text() == "kept" and (d / "b").read_text() == "1"
    _build(d, "replace", {"c": "3"})
    assert _names(d) == ["c"]
    assert _names(tmp_path) == ["d"]  # no temporaries, no old copies


@pytest.mark.parametrize("existing", ["error", "replace", "merge"])
def test_interrupted_atomic_dir_leaves_the_old_one(tmp_path, existing):
    d = tmp_path / "d"
    _build(d, "error", {"a": "old"})
    with pytest.raises(KeyboardInterrupt):
        _build(d, existing, {"a": "new", "b": "new"}, fail=True)
    assert _names(d) == ["a"] and (d / "a").read_text() == "old"
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "e", existing, {"a": "new"}, fail=True)
    assert _names(tmp_path) == ["d"]


def test_merge_links_not_copies(tmp_path):
    d = tmp_path / "d"
    _build(d, "error", {"big": "x" * 1000})
    ino = (d / "big").stat().st_ino
    _build(d, "merge", {"a": "1"})
    assert (d / "big").stat().st_ino == ino


def test_read_json_object_errors(tmp_path):
    f = tmp_path / "config.json"
    with pytest.raises(SpecCompileError, match="draft: .*config.json is missing; add it"):
        read_json_object(f, "draft", hint="add it")
    f.write_text("{x")
    with pytest.raises(SpecCompileError, match="not valid JSON"):
        read_json_object(f, "model")
    f.write_text("[1]")
    with pytest.raises(SpecCompileError, match="must hold a JSON object"):
        read_json_object(f, "model")
    f.write_text('{"a": 1}')
    assert read_json_object(f, "model") == {"a": 1}


def test_cli_entry_exit_codes(capsys):
    @cli_entry(interrupted="interrupted: nothing written")
    def main(what):
        if what == "bad":
            raise SpecCompileError("first line\nsecond line")
        if what == "ctrl-c":
            raise KeyboardInterrupt
        if what == "bug":
            raise RuntimeError("a bug keeps its traceback")
        return 0

    assert main("ok") == 0 and main.__name__ == "main"
    assert main("bad") == 2  # one line, the newline shown as an escape
    assert capsys.readouterr().err == "error: first line\\nsecond line\n"
    assert main("ctrl-c") == 130
    assert capsys.readouterr().err == "interrupted: nothing written\n"
    assert main("bug") == 1  # a bug: one line, the traceback only with --verbose
    assert capsys.readouterr().err == ("error: internal error: RuntimeError: a bug keeps its traceback; "
                                       "rerun with --verbose for the traceback\n")


def test_atomic_dir_gives_private_files_the_usual_mode(tmp_path):
    """safetensors writes 0600 files: an engine built by one user must be readable by the
    account that serves it, like every other file of the directory."""
    from safetensors.torch import save_file
    import torch

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "engine") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "weights.safetensors"))
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o750)  # a mode chosen on purpose stays
    finally:
        os.umask(old)
    assert (tmp_path / "engine" / "weights.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "engine" / "run.sh").stat().st_mode & 0o777 == 0o750


def test_ctrl_c_that_a_library_turned_into_another_error_is_still_an_interrupt(capsys):
    """torch.export's fake-tensor dispatch, hit by Ctrl-C mid-trace, raises an unrelated error from
    the KeyboardInterrupt: the command still says `interrupted` and exits 130, and a real bug
    afterwards is a bug again (the handler is gone with the command)."""
    @cli_entry(interrupted="interrupted: no engine written")
    def main(what):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        except KeyboardInterrupt:
            raise TypeError("fake tensor raised while tracing")
        return 0

    # Python's default SIGINT handling, as in a terminal (a test run started in the background
    # inherits SIGINT ignored, and then no Ctrl-C can arrive and none is counted)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main("x") == 130
        assert capsys.readouterr().err == "interrupted: no engine written\n"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved)

    @cli_entry()
    def bug(argv):
        raise TypeError("a real bug")

    assert bug([]) == 1 and "internal error: TypeError: a real bug" in capsys.readouterr().err


def test_every_entry_point_is_wrapped():
    from spec_compiler import cli, smollm2
    from spec_compiler.train import cli as train_cli, corpus, evaluate, fit_tree

    for main in (cli.compile_main, cli.run_main, train_cli.main, smollm2.main, fit_tree.main,
                 evaluate.main, corpus.main):
        assert hasattr(main, "__wrapped__"), main.__module__


def test_no_private_cross_module_imports():
    """`from .x import _name` across modules: none in the files this test covers."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "spec_compiler"
    files = [root / f for f in ("cli.py", "config.py", "loading.py", "smollm2.py", "fileio.py",
                                "hashing.py", "errors.py")]
    files += sorted((root / "train").glob("*.py")) + sorted((root / "models").glob("*.py"))
    pat = re.compile(r"^\s*from \S+ import (?:\(([^)]*)\)|(.*))$", re.M)
    for f in files:
        for group in pat.findall(f.read_text()):
            names = re.split(r"[\s,]+", " ".join(group).split("#")[0])
            assert not [n for n in names if n.startswith("_")], (f, group)
    assert "from .cli" not in (root / "train" / "loop.py").read_text()  # no cycle with cli.py
