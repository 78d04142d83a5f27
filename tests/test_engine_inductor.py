"""Inductor backend end to end, one engine per tree kind, and loading without compiling.

Each engine is an AOTInductor build of the four step graphs; generation must be token-identical
to transformers. The static-tree engine uses the oracle draft, so acceptance and KV compaction
run in compiled code; a chain engine's oracle has a reduced (hot-token) vocabulary, so the
column -> target id mapping runs in compiled code too. A fresh process with an empty Inductor cache and Inductor's compile entry
points patched to raise must load an engine and generate the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import OracleDraft, build_engine, expected_emitted, hf_greedy, make_random_draft, oracle_hot_ids
from spec_compiler.runtime import Engine
from spec_compiler.loading import load_draft, load_target
from spec_compiler.trees import resolve_tree

REPO = Path(__file__).resolve().parents[1]
PROMPT = [17, 45, 3, 99, 12, 7, 88, 23, 64, 31, 5]
RANK_OF, POISONED = (lambda p: (p // 2) % 2), (lambda p: p % 9 in (0, 4))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir, tiny_draft_dir):
    root = tmp_path_factory.mktemp("inductor")
    (root / "tree.json").write_text(json.dumps([[0], [1], [0, 0], [1, 0], [0, 0, 0]]))
    seq = PROMPT + hf_greedy(tiny_dir, PROMPT, 200, eos=[])
    oracle = OracleDraft(load_draft(tiny_draft_dir, load_target(tiny_dir)), seq, 128, 128, RANK_OF, POISONED)
    engines = {
        "static": build_engine(root / "static", tiny_dir, tree="mc_sim_7b_63", draft_dir=tiny_draft_dir,
                               backend="inductor", max_seq_len=128, draft_module=oracle),
        # greedy only (--no-sampling): the sampled verify graph is compiled once, in "static"
        "chain": build_engine(root / "chain", tiny_dir, tree="chain-2", draft_dir=tiny_draft_dir,
                              backend="inductor", max_seq_len=128, sampling=False),
        "user": build_engine(root / "user", tiny_dir, tree=str(root / "tree.json"),
                             draft_dir=tiny_draft_dir, backend="inductor", max_seq_len=128, sampling=False),
    }
    return engines, seq


@pytest.mark.parametrize("kind", ["static", "chain", "user"])
def test_inductor_engine_matches_transformers(built, tiny_dir, kind):
    engines, seq = built
    engine = Engine.load(engines[kind])
    assert engine.spec.backend == "inductor"
    for p in (PROMPT, [9] * 20):
        res = engine.generate(p, max_new_tokens=50)
        assert res.output_ids == hf_greedy(tiny_dir, p, 50)
    if kind == "static":  # the oracle: acceptance + compaction in compiled code
        res = engine.generate(PROMPT, max_new_tokens=60)
        assert res.output_ids == seq[len(PROMPT):len(PROMPT) + 60]
        exp = expected_emitted(resolve_tree("mc_sim_7b_63"), len(PROMPT), res.verify_calls, RANK_OF, POISONED)
        assert res.accept_lengths[:-1] == exp[:-1] and res.tokens_per_call > 2.0


def test_manifest_records_passes(built):
    engines, _ = built
    m = json.loads((engines["static"] / "manifest.json").read_text())
    assert m["backend"] == "inductor" and len(m["fingerprint"]) == 64
    assert set(m["graphs"]) == {"prefill", "verify", "verify_sampled", "draft_prefill", "draft"}
    for name, g in m["graphs"].items():
        assert g["passes"][-1] == "cleanup" and "static_kv_cache" in g["passes"]
        for p in ("tree_attention", "static_kv_cache", "fuse_projections"):
            assert g["pass_counts"][p] > 0, (name, p)
    assert m["graphs"]["draft"]["pass_counts"]["unroll_draft"] > 0
    assert m["graphs"]["verify"]["pass_counts"]["accept_epilogue"] > 0
    assert m["graphs"]["verify_sampled"]["pass_counts"]["accept_epilogue"] > 0
    assert set(m["files"]) >= {"verify_sampled.pt2"}
    assert set(m["files"]) >= {"weights.safetensors", "verify.pt2", "draft.pt2"}


def test_cache_writes_touch_only_the_written_slots(built):
    """The in-place cache writes compile to stores of the written rows: no kernel loops over a
    whole cache (a functional scatter compiled to copy the cache out, scatter, copy it back:
    on a CPU more bytes per step than the weights)."""
    import re
    import zipfile

    engines, _ = built
    for kind, path in engines.items():
        m = json.loads((path / "manifest.json").read_text())
        dims = m["dims"]
        assert {"prefill", "verify", "draft_prefill", "draft"} <= set(m["graphs"])
        for graph in m["graphs"]:
            heads, dh = ((dims["n_kv_heads"], dims["head_dim"]) if not graph.startswith("draft")
                         else (dims["draft_kv_heads"], dims["draft_head_dim"]))
            numel = dims["batch"] * heads * dims["max_seq_len"] * dh
            with zipfile.ZipFile(path / f"{graph}.pt2") as z:
                src = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("kernel.cpp"))
            assert src and not re.search(rf"<static_cast<int64_t>\({numel}L\)", src), (kind, graph)


def test_inductor_hot_vocab_oracle(tmp_path, tiny_dir):
    """The oracle restricted to a hot set (chain-2, never poisoned): it proposes the target's
    next token exactly when that token is hot, so acceptance stops exactly where it is not."""
    from safetensors.torch import load_file

    P = 11
    p = torch.randint(3, 128, (P,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = p + hf_greedy(tiny_dir, p, 120, eos=[])
    hot = oracle_hot_ids()
    hot_dir = make_random_draft(tmp_path / "hot", tiny_dir, hot_ids=hot)
    oracle = OracleDraft(load_draft(hot_dir, load_target(tiny_dir)), seq, 128, 128, lambda q: 0, lambda q: False)
    out = build_engine(tmp_path / "e", tiny_dir, tree="chain-2", draft_dir=hot_dir, backend="inductor",
                       max_seq_len=128, draft_module=oracle, sampling=False)
    assert load_file(out / "weights.safetensors")["draft.inner.hot_ids"].tolist() == hot  # OracleDraft.inner
    res = Engine.load(out).generate(p, max_new_tokens=60)
    assert res.output_ids == seq[P:P + 60]
    exp = expected_emitted(resolve_tree("chain-2"), P, res.verify_calls, lambda q: 0,
                           lambda q: seq[q + 2] not in hot)
    assert res.accept_lengths[:-1] == exp[:-1]
    assert set(exp[:-1]) == {1, 2, 3}, "cut at every depth, and full chains too"


NO_COMPILE = r"""
import json, sys
import torch, torch._inductor, torch._inductor.codecache as cc, torch._inductor.compile_fx as cf

def boom(*a, **k):
    raise AssertionError("Inductor compiled while loading an engine")

torch._inductor.aoti_compile_and_package = boom
torch._inductor.aot_compile = boom
cf.compile_fx = cf.compile_fx_inner = cf.compile_fx_aot = boom
cc.AotCodeCompiler.compile = staticmethod(boom)
cc.CppCodeCache.load = boom
torch.compile = boom
from spec_compiler.runtime import Engine
e = Engine.load(sys.argv[1])
r = e.generate(json.loads(sys.argv[2]), max_new_tokens=30)
print(json.dumps(r.output_ids))
"""


# Spawning anything is refused: Inductor's CPU vector-ISA probe (reached through
# aoti_load_package's device-information check) asks `g++ --version` and dlopens test programs
# in fresh Pythons, tens of seconds on a cold start; a compiler lookup would spawn too.
NO_SUBPROCESS = r"""
import json, os, subprocess, sys, time
import torch, transformers

def boom(*a, **k):
    raise AssertionError(f"a process was started while loading an engine: {a[:1]}")

subprocess.Popen.__init__ = boom
os.system = os.posix_spawn = os.fork = boom
t = time.perf_counter()
from spec_compiler.runtime import Engine
e = Engine.load(sys.argv[1])
load = time.perf_counter() - t
r = e.generate(json.loads(sys.argv[2]), max_new_tokens=30)
print(json.dumps({"ids": r.output_ids, "load_s": load}))
"""


@pytest.mark.parametrize("script", [NO_COMPILE, NO_SUBPROCESS], ids=["no_compile", "no_subprocess"])
def test_load_compiles_and_spawns_nothing(built, tmp_path, tiny_dir, script):
    """A fresh interpreter with an empty Inductor cache (in-process, an earlier probe's cached
    result would hide the cost) loads an engine and generates, with compiling or spawning made
    to fail."""
    engines, _ = built
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty_cache"),
           "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", script, str(engines["chain"]), json.dumps(PROMPT)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ids = out["ids"] if isinstance(out, dict) else out
    assert ids == hf_greedy(tiny_dir, PROMPT, 30)
    assert not (tmp_path / "empty_cache").exists() or not any((tmp_path / "empty_cache").rglob("*.so"))


def test_parallel_lowering_waits_for_gpu_memory(tmp_path, monkeypatch):
    """On a GPU, a graph's worker starts only while the running workers' estimated memory leaves
    room for it (an 8B engine's four workers ran an H200 out of memory); a graph larger than the
    whole budget still runs, alone. Workers are threads here, the budget is patched, and the
    lowering is a stand-in that records how many run at once."""
    import concurrent.futures as cf
    import threading
    import time

    from torch import fx

    from spec_compiler import pipeline

    running, peak, lock = [0], [0], threading.Lock()

    def fake_lower(src, path, device, tp):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.5)
        with lock:
            running[0] -= 1

    class Pool(cf.ThreadPoolExecutor):
        def __init__(self, n, mp_context=None):
            super().__init__(n)

    monkeypatch.setattr(cf, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(pipeline, "lower_saved", fake_lower)

    def f(w, x):
        return x @ w

    def todo():
        return [(f"f{i}", fx.symbolic_trace(f), [torch.randn(64, 64), torch.randn(2, 64)], tmp_path / f"f{i}.pt2")
                for i in range(4)]

    _, gm, args, path = todo()[0]
    one = pipeline.save_exported(gm, args, path.with_suffix(".export.pt2"))[1]
    for budget, most in ((0, 1), (2 * one, 2), (None, 4)):  # none fits / two fit / off the GPU
        monkeypatch.setattr(pipeline, "gpu_worker_budget", lambda device, b=budget: b)
        peak[0], logs = 0, []
        pipeline.lower_all(todo(), "inductor", "cuda", 4, logs.append)
        assert sum("lowered (" in line for line in logs) == 4, logs
        assert peak[0] <= most and (budget is None or peak[0] == most), (budget, peak[0])
        assert not list(tmp_path.glob("*.export.pt2"))


def test_a_lowering_worker_shares_one_buffer_among_the_weights(tmp_path):
    """A worker's example inputs: the read-only large inputs (weights) view one buffer the size
    of the largest, the written ones (caches) and small ones are their own; the estimate counts
    that; and a package lowered from such inputs computes what the graph does on real ones."""
    from spec_compiler.export.lower import example_inputs_for, lower_saved, save_exported, worker_bytes
    from spec_compiler.runtime.aoti import load_package

    class Step(torch.nn.Module):
        def forward(self, w1, w2, cache, x, pos):
            h = x @ w1 + (x @ w2.t()).relu()  # two weights, one read transposed
            cache.index_copy_(0, pos, h)  # the graph writes the cache
            return cache.sum(0), h

    n = 512  # 1 MiB weights in float32: shared
    args = [torch.randn(n, n), torch.randn(n, n), torch.zeros(8, n), torch.randn(2, n), torch.tensor([1, 5])]
    gm = torch.export.export(Step(), tuple(a.clone() for a in args), strict=False).module()
    src, need = save_exported(gm, [a.clone() for a in args], tmp_path / "s.export.pt2")
    ep = torch.export.load(src)
    w1, w2, cache, x, pos = example_inputs_for(ep)
    assert w1.untyped_storage().data_ptr() == w2.untyped_storage().data_ptr()
    assert cache.untyped_storage().data_ptr() != w1.untyped_storage().data_ptr()
    assert (w1.shape, w1.stride(), w2.shape, w2.stride()) == ((n, n), (n, 1), (n, n), (n, 1))
    assert need == worker_bytes(ep) == int(1.25 * (n * n * 4 + 8 * n * 4 + 2 * n * 4 + 2 * 8)) + (2 << 30)
    package = load_package(lower_saved(src, str(tmp_path / "s.pt2"), "cpu"), "cpu")
    real = [a.clone() for a in args]
    got = package(*real)
    want_cache = args[2].clone()
    want = Step()(args[0], args[1], want_cache, args[3], args[4])
    assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want))
    assert torch.allclose(real[2], want_cache, atol=1e-4)  # the package wrote the real cache


def test_parallel_lowering_gives_working_packages(tmp_path, monkeypatch):
    """lower_all with jobs > 1 (what --jobs does for the buckets' graphs): each graph exported
    here, saved without its example inputs, and lowered by Inductor in a spawned worker, gives
    a package that computes what the graph does. While no graph finishes, progress lines name
    the graphs being lowered and for how long."""
    import re

    from helpers import small_graphs

    from spec_compiler import pipeline
    from spec_compiler.pipeline import lower_all
    from spec_compiler.runtime.aoti import load_package

    monkeypatch.setattr(pipeline, "HEARTBEAT_S", 0.25)  # a worker's start alone takes longer
    todo = small_graphs(tmp_path)
    logs = []
    lower_all(todo, "inductor", "cpu", 2, logs.append)
    assert any("2 at a time" in s for s in logs) and not list(tmp_path.glob("*.export.pt2"))
    labels = {label for label, *_ in todo}
    beats = [s for s in logs if s.startswith("[3/4] still lowering: ")]
    assert beats, logs
    for s in beats:
        running = re.findall(r"(\S+) \((\d+) s\)", s.removeprefix("[3/4] still lowering: "))
        assert running and {label for label, _ in running} <= labels, s
    # the lines stop once every graph is lowered
    assert logs.index(beats[-1]) < max(i for i, s in enumerate(logs) if ": lowered (" in s)
    for (_, gm, args, path) in todo:
        got = load_package(path, "cpu")(*args)
        want = gm(*args)
        assert all(torch.allclose(g, w) for g, w in zip(got, want)), path.name


def test_int_array_names_stay_declared_in_every_wrapper_buffer():
    """Inductor's C++ wrapper caches a declared size array's name under the id() of the buffer it
    was written into; a short-lived buffer dies and the next one at its address got a name it
    never declared (a C++ compile error of an 8B graph on the GPU). Under
    `stable_int_array_keys` every fresh buffer gets its own declaration."""
    from itertools import count

    cpp = pytest.importorskip("torch._inductor.codegen.cpp_wrapper_cpu")
    from torch._inductor.utils import IndentedBuffer
    from torch.utils._ordered_set import OrderedSet

    from spec_compiler.export.lower import stable_int_array_keys

    wrapper = cpp.CppWrapperCpu.__new__(cpp.CppWrapperCpu)
    wrapper.int_array_id, wrapper.declared_int_array_vars = count(), OrderedSet()
    wrapper.codegen_int_array_var_cache = {}
    original = cpp.CppWrapperCpu.__dict__["codegen_int_array_var"]
    with stable_int_array_keys():
        for _ in range(64):
            buf = IndentedBuffer()  # dies at the next iteration, as the wrapper's scratch buffers do
            name = wrapper.codegen_int_array_var("{4L, 8L}", buf.writeline, known_statically=True)
            assert name in buf.getvalue()
    assert cpp.CppWrapperCpu.__dict__["codegen_int_array_var"] is original  # restored
