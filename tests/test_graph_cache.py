"""The lowered-graph cache (export/graph_cache.py): a program saved twice has one key, anything that
changes the artifact changes the key, and lowering through the cache gives packages that compute
what the graph does, from the cache the second time, in this process and in parallel workers."""

import pytest
import torch
from helpers import small_graphs

from spec_compiler.export.graph_cache import ENV, GraphCache, cache_root, program_bytes, program_digest
from spec_compiler.pipeline import lower_all
from spec_compiler.runtime.aoti import load_package


class Block(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("table", torch.arange(8.0) * scale)  # a constant inside the program

    def forward(self, w, x):
        return (x @ w).relu() + self.table


def exported(scale=1.0, rows=2):
    return torch.export.export(Block(scale), (torch.randn(8, 8), torch.randn(rows, 8)), strict=False)


def test_one_program_one_digest_whatever_changes_the_program_changes_it():
    a, b = program_digest(program_bytes(exported())), program_digest(program_bytes(exported()))
    assert a == b  # two exports of one module: provenance and serialization ids differ, the key not
    assert program_digest(program_bytes(exported(rows=3))) != a  # another input shape
    assert program_digest(program_bytes(exported(scale=2.0))) != a  # another constant


def test_example_inputs_do_not_enter_the_key_and_are_kept():
    ep = exported()
    before = ep.example_inputs
    ep2 = exported()
    ep2.example_inputs = ((torch.zeros(8, 8), torch.zeros(2, 8)), {})
    assert program_digest(program_bytes(ep)) == program_digest(program_bytes(ep2))
    assert ep.example_inputs is before


def test_settings_that_shape_the_artifact_are_in_the_key(tmp_path):
    saved = program_bytes(exported())
    base = GraphCache(tmp_path, "inductor", "cpu", 1).key(saved)
    assert GraphCache(tmp_path, "inductor", "cpu", 2).key(saved) != base
    assert GraphCache(tmp_path, "inductor", "cpu", 1).key(saved) == base


def test_where_the_cache_lives_and_turning_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert GraphCache.for_lowering("inductor", "cpu") is not None
    assert GraphCache.for_lowering("eager", "cpu") is None  # nothing worth keeping
    monkeypatch.setenv(ENV, "off")
    assert cache_root() is None and GraphCache.for_lowering("inductor", "cpu") is None
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "spec-compiler" / "graphs"


@pytest.mark.parametrize("jobs", [1, 2], ids=["in-process", "workers"])
def test_lowering_twice_takes_every_graph_from_the_cache(tmp_path, monkeypatch, jobs):
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    for run in ("first", "second"):
        out = tmp_path / run
        out.mkdir()
        logs, todo = [], small_graphs(out)
        lower_all(todo, "inductor", "cpu", jobs, logs.append)
        hits = sum("taken from the graph cache" in line for line in logs)
        assert hits == (0 if run == "first" else 2), logs
        if run == "second":
            assert not any("lowering the graphs" in line for line in logs)  # no worker started
        for _, gm, args, path in todo:
            got, want = load_package(path, "cpu")(*args), gm(*args)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (run, path.name)
    assert len(list((tmp_path / "cache").rglob("*.pt2"))) == 2
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_cache_that_cannot_be_written_is_a_miss_said_once(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(ENV, str(blocker))
    todo = small_graphs(tmp_path)
    lower_all(todo, "inductor", "cpu", 1, lambda s: None)
    err = capsys.readouterr().err
    assert err.count("graph cache: cannot write") == 1 and f"{ENV}=off" in err
    for _, gm, args, path in todo:
        assert all(torch.equal(g, w) for g, w in zip(load_package(path, "cpu")(*args), gm(*args)))


def test_a_failing_worker_names_its_graph_and_the_others_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    todo = small_graphs(out)
    todo[1][3].mkdir()  # a folder where the worker's package should go: it cannot write it
    logs = []
    with pytest.raises(RuntimeError, match=r"lowering the graph f\.b4 with inductor failed"):
        lower_all(todo, "inductor", "cpu", 2, logs.append)
    assert any("f.b1: lowered" in line for line in logs), logs
    assert len(list((tmp_path / "cache").rglob("*.pt2"))) == 1  # the good graph was cached
