"""One Engine driven from several threads: calls are serialised by `engine.lock` (generate()
holds it for the whole generation, `engine.session()` for a start -> step -> result protocol),
so every thread gets exactly its single-threaded tokens; an exception releases the lock."""

from __future__ import annotations

import threading

import pytest

from helpers import build_engine
from spec_compiler.errors import SpecCompileError
from spec_compiler.runtime import Engine

CASES = [([5, 6, 7], 14), ([9, 3, 100, 44, 2, 17, 8, 61, 12], 10), ([1], 16), ([30, 31], 12),
         ([77, 10, 10, 10, 4], 15), ([120, 64, 1, 99], 11)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_dir, tiny_draft_dir):
    d = build_engine(tmp_path_factory.mktemp("threads") / "engine", tiny_dir,
                     draft_dir=tiny_draft_dir, max_seq_len=128, chunk=8)
    return Engine.load(d)


@pytest.fixture(scope="module")
def expected(engine):
    return [engine.generate(ids, max_new_tokens=n).output_ids for ids, n in CASES]


def _by_session(engine, ids, n):
    with engine.session():
        engine.start(ids, n)
        while engine.running():
            engine.step()
        return engine.result()


def _run_threads(fns, timeout=300):
    """Run the callables at once (a barrier), each in its own thread; their results or errors."""
    barrier, out = threading.Barrier(len(fns)), [None] * len(fns)

    def run(i):
        barrier.wait()
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001  (reported to the test)
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    return out


def test_threads_get_their_own_tokens(engine, expected):
    """Six threads, each generating its own prompt three times (half through generate(), half
    through the start/step/result protocol in a session), all at once: exact single-threaded
    tokens every time."""
    def work(i):
        ids, n = CASES[i]
        gen = (lambda: engine.generate(ids, max_new_tokens=n)) if i % 2 else (lambda: _by_session(engine, ids, n))
        return [gen().output_ids for _ in range(3)]

    got = _run_threads([lambda i=i: work(i) for i in range(len(CASES))])
    for i, g in enumerate(got):
        assert g == [expected[i]] * 3, (i, g)


def test_session_holds_off_other_threads(engine, expected):
    """A generate() from another thread waits while a session is open, then runs."""
    opened, release, finished = threading.Event(), threading.Event(), threading.Event()
    res = {}

    def holder():
        with engine.session():
            opened.set()
            release.wait(60)

    def other():
        res["out"] = engine.generate(*CASES[0]).output_ids
        finished.set()

    h = threading.Thread(target=holder)
    h.start()
    assert opened.wait(60)
    o = threading.Thread(target=other)
    o.start()
    assert not finished.wait(1.0), "generate() ran inside another thread's session"
    release.set()
    h.join(60)
    o.join(120)
    assert res["out"] == expected[0]


def test_a_failing_call_releases_the_lock(engine, expected, monkeypatch):
    """A bad request, and a failure in the middle of a generation, raise in their own thread;
    the lock is free afterwards and the other threads still get their exact tokens."""
    verify, calls = engine.graphs["verify"], []

    def flaky(*args, **kwargs):  # the first verify call fails, as a device error would
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device error")
        return verify(*args, **kwargs)

    monkeypatch.setitem(engine.graphs, "verify", flaky)
    got = _run_threads([lambda: engine.generate([999]), lambda: engine.generate(*CASES[1]),
                        lambda: engine.generate(*CASES[2]), lambda: engine.generate(*CASES[3])])
    assert isinstance(got[0], SpecCompileError) and "999" in str(got[0])
    failed = [g for g in got[1:] if isinstance(g, RuntimeError)]
    assert len(failed) == 1 and "device error" in str(failed[0]), got
    for i, g in enumerate(got[1:], 1):
        assert isinstance(g, RuntimeError) or g.output_ids == expected[i], (i, g)
    assert _run_threads([_try_lock(engine)]) == [True]  # nobody holds it
    monkeypatch.undo()
    assert engine.generate(*CASES[1]).output_ids == expected[1]


def _try_lock(engine):
    def attempt():
        if not engine.lock.acquire(blocking=False):
            return False
        engine.lock.release()
        return True
    return attempt
