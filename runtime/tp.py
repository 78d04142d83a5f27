"""Tensor-parallel ranks: the process group a TP engine runs in, and the launcher that starts it.

An engine compiled with --tp N runs as N processes, one per rank (one GPU each on CUDA), each
with its own weights (`engine_format.weights_file`) and the same host loop on the same inputs.
The target graphs' all-reduces (passes/tensor_parallel.py) leave every rank with the same
logits, so acceptance, sampling (the counter-based per-sequence RNG) and every host decision come
out the same on every rank: no broadcast of tokens. What is not a function of the inputs is
taken from rank 0 (`same`): a seed drawn for a sampled request, spec-serve's admissions.
The ranks' process group is the default one (its name, "0", is what the graphs' collectives
call): gloo on CPU, NCCL on CUDA. `spec-run`/`spec-serve` start the ranks themselves (`launch`,
torchrun's environment variables), or run as one rank under `torchrun --nproc-per-node N`.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from spec_compiler import engine_format as fmt
from spec_compiler.config import usable_cpus
from spec_compiler.errors import SpecCompileError
from spec_compiler.fileio import read_json_object
from spec_compiler.passes.tensor_parallel import GROUP

RANK_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """This process is one rank of a launch (ours or torchrun's)."""
    return all(k in os.environ for k in RANK_ENV)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def join(tp: int, device: str) -> int:
    """Join the process group of a `tp`-rank launch (torchrun's environment variables), unless
    one is initialised already; returns this rank. Ranks but 0 print nothing to stdout."""
    if not dist.is_initialized():
        world = int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise SpecCompileError(f"started as {world} ranks, but the engine is built for --tp {tp}; "
                                   f"start {tp} (torchrun --nproc-per-node {tp}) or let spec-run start them")
        cuda = device.startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))  # one GPU per rank
            check_gpus(local + 1)
            torch.cuda.set_device(local)
        # A long timeout: spec-serve's other ranks wait on the store (`same`) while it is idle.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=30))
        atexit.register(leave)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank()


def rank_of(engine_dir: Path, tp: int) -> int:
    """This process's rank in the initialised process group a `tp`-rank engine runs in."""
    if not dist.is_initialized():
        raise SpecCompileError(f"{engine_dir} is built for --tp {tp}: load it in each of {tp} ranks of an "
                               f"initialised process group (spec-run starts them; or torchrun "
                               f"--nproc-per-node {tp})")
    if dist.get_world_size() != tp:
        raise SpecCompileError(f"{engine_dir} is built for --tp {tp}, the process group has "
                               f"{dist.get_world_size()} ranks; run it with {tp}")
    if dist.group.WORLD.group_name != GROUP:
        raise SpecCompileError(f"the default process group is named {dist.group.WORLD.group_name!r}, the "
                               f"engine's collectives use {GROUP!r} (the first group a process creates); "
                               "initialise it once, before any other group")
    return dist.get_rank()


def check_gpus(n: int) -> None:
    have = torch.cuda.device_count()
    if have < n:
        raise SpecCompileError(f"the engine runs one rank per GPU and needs {n} GPUs, {have} are visible; "
                               "run it on a machine with more, or rebuild it with a smaller --tp")


def same(value):
    """Rank 0's `value` on every rank (a small picklable object), through the process group's
    key-value store. Why not a gloo broadcast (broadcast_object_list): gloo's worker thread
    frees the tensors it sent after the call has returned, and freeing a tensor made in Python
    takes the GIL; an AOTInductor call holds the GIL while it waits in its all-reduce, which
    that same worker thread must run: a deadlock (seen in spec-serve). The store has no such
    thread. The last rank to read a value deletes it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    _SENT[0] += 1
    key = f"spec_compiler/same/{_SENT[0]}"
    if dist.get_rank() == 0:
        store.set(key, pickle.dumps(value))
        return value
    value = pickle.loads(store.get(key))
    if store.add(key + "/read", 1) == dist.get_world_size() - 1:
        store.delete_key(key)
        store.delete_key(key + "/read")
    return value


_SENT = [0]  # values sent so far: the same count on every rank (every rank makes the same calls)


def leave() -> None:
    """At exit: the process group torn down (its threads joined). A group left to the
    interpreter's teardown can abort the process ("terminate called without an active
    exception") while a peer still talks to it."""
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(status: int) -> int:
    """A launched rank's last step: when it succeeded, wait for every rank to get here, so no
    rank tears its group down while another still uses it (then `leave` at exit). A failed
    rank does not wait: the launcher stops the others."""
    if status == 0 and dist.is_initialized():
        dist.barrier()
    return status


def launch(entry: str, argv: list[str], tp: int, device: str) -> int:
    """Run `entry` ("module:function", called with argv, returning an exit status) as `tp` ranks,
    child processes with torchrun's environment variables (MASTER_PORT a free port). Rank 0's
    output is this process's, the others' stdout is dropped. A rank that fails stops the others;
    its status is returned (else 0). SIGTERM is passed on to rank 0 (spec-serve's drain: it tells
    the others); Ctrl-C reaches every rank from the terminal."""
    if device.startswith("cuda"):
        check_gpus(tp)
    port = free_port()
    # On a CPU the ranks share the cores: each rank's OpenMP threads spin while the others are
    # in an all-reduce, so more threads than cores over all ranks slows a step many times.
    cpu_threads = max(1, usable_cpus() // tp)
    module, fn = entry.split(":")
    code = (f"import sys; from {module} import {fn}; from spec_compiler.runtime.tp import finish; "
            f"sys.exit(finish({fn}(sys.argv[1:])))")
    procs = []
    for r in range(tp):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(tp),
               "LOCAL_WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if not device.startswith("cuda"):  # the cores shared out (as torchrun does)
            env.setdefault("OMP_NUM_THREADS", str(cpu_threads))
        procs.append(subprocess.Popen([sys.executable, "-c", code, *argv], env=env, preexec_fn=_die_with_parent,
                                      stdout=None if r == 0 else subprocess.DEVNULL))
    prev = signal.signal(signal.SIGTERM, lambda sig, frame: procs[0].send_signal(sig))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                return failed[0] if failed else 0
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        signal.signal(signal.SIGTERM, prev)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a rank, before exec: SIGKILL when the launcher dies (Linux), so no rank outlives it."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Leader:
    """Rank 0's engine in spec-serve: the engine, whose admit/cancel/finished calls are
    recorded and sent to the other ranks (`follow`) at each step, before it runs, so every rank
    makes the same calls in the same order. A sampled request without a seed gets one here,
    so every rank samples with it."""

    def __init__(self, engine):
        self.engine, self.ops = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def admit(self, prompt_ids, max_new_tokens=None, temperature=0.0, top_p=1.0, top_k=0, seed=None):
        if temperature > 0 and seed is None:
            seed = secrets.randbits(63)
        args = (list(prompt_ids), max_new_tokens, temperature, top_p, top_k, seed)
        slot = self.engine.admit(*args)
        self.ops.append(("admit", args))
        return slot

    def cancel(self, slot: int) -> None:
        self.engine.cancel(slot)
        self.ops.append(("cancel", (slot,)))

    def finished(self):
        self.ops.append(("finished", ()))
        return self.engine.finished()

    def step(self) -> None:
        ops, self.ops = [*self.ops, ("step", ())], []
        same(ops)
        self.engine.step()

    def close(self) -> None:
        """The server stopped: so do the other ranks."""
        same(None)


def follow(engine) -> None:
    """A rank but 0 in spec-serve: make rank 0's engine calls (`Leader`) until it closes."""
    while (ops := same(None)) is not None:
        for name, args in ops:
            getattr(engine, name)(*args)


def engine_tp(engine_dir: Path, want: int | None) -> tuple[int, str]:
    """(tp, device) of an engine; `want` (--tp), if given, must be its tp. A single-device
    engine's manifest is only peeked at: Engine.load checks it whole next, fingerprint included,
    and checking it here as well would hash every file twice per run. A TP engine's is checked
    whole here, before any rank starts, so a bad one is one line, not one per rank."""
    from spec_compiler.runtime.loader import read_spec

    if not Path(engine_dir).is_dir():
        raise SpecCompileError(f"engine {engine_dir} does not exist; build it with spec-compile")
    path = Path(engine_dir) / fmt.MANIFEST
    m = read_json_object(path, "engine", fix="rebuild the engine with spec-compile") if path.is_file() else {}
    parallel, device = m.get("parallel"), m.get("device")
    tp = parallel.get("tp") if isinstance(parallel, dict) else None  # else read_spec says what is wrong
    if tp != 1 or not isinstance(device, str):
        spec = read_spec(engine_dir)
        tp, device = spec.tp, spec.device
    if want is not None and want != tp:
        raise SpecCompileError(f"--tp {want}: {engine_dir} is built for --tp {tp}; drop --tp or "
                               f"pass --tp {tp}")
    return tp, device
