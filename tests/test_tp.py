"""Tensor parallelism on CPU (gloo): TP engines give transformers' greedy tokens on every rank,
the same tokens as the single-device engine, the same sampled tokens on every rank; spec-run
starts the ranks itself (or runs under torchrun); bad --tp values are one line and exit 2.
Each engine is compiled once per degree (module fixtures); the ranks run as child processes
(`rank_main` below, started by the launcher runtime/tp.py uses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from helpers import build_engine, hf_greedy, make_random_draft, make_tiny_checkpoint
from serve_helpers import ServerProcess, add_byte_tokenizer
from spec_compiler.chat import decode, load_tokenizer

TESTS = Path(__file__).resolve().parent
PROMPTS = [[17, 45, 3, 99, 12, 7, 88, 23, 64, 31, 5], [9] * 20]
N_NEW = 16


def rank_main(argv: list[str]) -> int:
    """One rank: load ENGINE_DIR in the launch's process group, generate PROMPTS greedy one by
    one, as a batch, and sampled (seed 5); write this rank's tokens to OUT_DIR/rank{r}.json."""
    from spec_compiler.runtime import Engine
    from spec_compiler.runtime import tp as ranks

    engine_dir, out_dir, tp = Path(argv[0]), Path(argv[1]), int(argv[2])
    rank = ranks.join(tp, "cpu")
    engine = Engine.load(engine_dir)
    out = {"greedy": [engine.generate(p, max_new_tokens=N_NEW).output_ids for p in PROMPTS]}
    if engine.dims.sampling:
        out["sampled"] = engine.generate(PROMPTS[0], max_new_tokens=N_NEW, temperature=1.0, seed=5).output_ids
    if engine.max_batch > 1:
        out["batch"] = [r.output_ids for r in engine.generate_batch(PROMPTS, max_new_tokens=N_NEW)]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    return 0


def run_ranks(engine: Path, tmp_path: Path, tp: int, monkeypatch) -> list[dict]:
    """Every rank's outputs (`rank_main`), the ranks started by runtime.tp.launch."""
    from spec_compiler.runtime.tp import launch

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    assert launch("test_tp:rank_main", [str(engine), str(tmp_path), str(tp)], tp, "cpu") == 0
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(tp)]


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """8 query heads, 4 kv heads (head_dim 8), a byte tokenizer (spec-serve reads text) and a
    random draft."""
    root = tmp_path_factory.mktemp("tp_gqa")
    target = make_tiny_checkpoint(root / "t", num_attention_heads=8, num_key_value_heads=4, vocab_size=260,
                                  eos_token_id=257, bos_token_id=256)
    add_byte_tokenizer(target)
    return target, make_random_draft(root / "d", target)


@pytest.fixture(scope="module")
def gqa2(tmp_path_factory):
    """8 query heads, 2 kv heads: at TP 4 each kv head is on two ranks."""
    root = tmp_path_factory.mktemp("tp_gqa2")
    target = make_tiny_checkpoint(root / "t", num_attention_heads=8, num_key_value_heads=2)
    return target, make_random_draft(root / "d", target)


def test_tp2_bushy_tree_batched_every_rank_equals_transformers(gqa, tmp_path, monkeypatch):
    """TP 2 (2 kv heads per rank), tree mc_sim_7b_63, two batch buckets, sampling. (The TP 1
    engine's greedy tokens are transformers' too: test_generate.)"""
    target, draft = gqa
    engine = build_engine(tmp_path / "tp2", target, draft_dir=draft, tree="mc_sim_7b_63", max_seq_len=96,
                          max_batch=2, tp=2)
    ranks = run_ranks(engine, tmp_path, 2, monkeypatch)
    assert ranks[0] == ranks[1]  # every rank emits the same tokens, sampled ones too
    want = [hf_greedy(target, p, N_NEW) for p in PROMPTS]
    assert ranks[0]["greedy"] == want
    assert ranks[0]["batch"] == want


def test_tp4_replicated_kv_heads_chain_equals_tp1(gqa2, tmp_path, monkeypatch):
    """TP 4 over 2 kv heads (each on two ranks), tree chain-3, the lm_head sharded by vocabulary
    (each rank computes a quarter of the logits, an all-gather joins them): the TP 1 engine's
    tokens. (TP 2 above has it replicated.)"""
    from spec_compiler.runtime import Engine

    target, draft = gqa2
    kw = dict(draft_dir=draft, tree="chain-3", max_seq_len=96, sampling=False)
    engine = build_engine(tmp_path / "tp4", target, tp=4, tp_lm_head="vocab", **kw)
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["parallel"] == {"tp": 4, "lm_head": "vocab"} and manifest["dims"]["n_kv_heads"] == 1
    assert manifest["graphs"]["verify"]["pass_counts"]["tensor_parallel"] == 2 * 2 + 1  # + the lm_head
    assert sorted(p.name for p in engine.glob("weights*")) == [f"weights.rank{r}.safetensors" for r in range(4)]
    ranks = run_ranks(engine, tmp_path, 4, monkeypatch)
    assert all(r == ranks[0] for r in ranks)
    assert ranks[0]["greedy"] == [hf_greedy(target, p, N_NEW) for p in PROMPTS]
    single = Engine.load(build_engine(tmp_path / "tp1", target, **kw))
    assert [single.generate(p, max_new_tokens=N_NEW).output_ids for p in PROMPTS] == ranks[0]["greedy"]


@pytest.fixture(scope="module")
def inductor_tp2(tmp_path_factory, gqa):
    """An AOTInductor TP 2 engine (plain decoding: two graphs to lower, each with collectives)."""
    return build_engine(tmp_path_factory.mktemp("tp_ind") / "e", gqa[0], tree="chain-0", backend="inductor",
                        max_seq_len=128, tp=2, sampling=False)


def test_inductor_tp2_through_spec_run(inductor_tp2, gqa):
    """spec-run reads tp from the manifest, starts both ranks and prints one result."""
    ids = ",".join(map(str, PROMPTS[0]))
    proc = spec_run(inductor_tp2, "--prompt-ids", ids, "--max-new-tokens", str(N_NEW), "--tp", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == decode(load_tokenizer(inductor_tp2 / "tokenizer", "test"),
                                 hf_greedy(gqa[0], PROMPTS[0], N_NEW)) + "\n"  # rank 0's text alone
    assert proc.stderr.count("tokens/s") == 1  # rank 0's stats line only


def test_spec_run_under_torchrun(inductor_tp2, gqa):
    from spec_compiler.runtime.tp import free_port

    ids = ",".join(map(str, PROMPTS[1]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "--no-python", str(Path(sys.executable).parent / "spec-run"),
                           str(inductor_tp2), "--prompt-ids", ids, "--max-new-tokens", str(N_NEW), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["output_ids"] == hf_greedy(gqa[0], PROMPTS[1], N_NEW)


def spec_run(*args) -> subprocess.CompletedProcess:
    code = "import sys; from spec_compiler.cli import run_main; sys.exit(run_main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_spec_run_bad_tp_is_one_line(inductor_tp2):
    proc = spec_run(inductor_tp2, "--prompt-ids", "1,2", "--tp", "4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --tp 4: {inductor_tp2} is built for --tp 2; drop --tp or pass --tp 2"]


def test_engine_load_outside_a_process_group_is_one_line(inductor_tp2):
    from spec_compiler.errors import SpecCompileError
    from spec_compiler.runtime import Engine

    with pytest.raises(SpecCompileError, match=r"built for --tp 2: load it in each of 2 ranks"):
        Engine.load(inductor_tp2)


@pytest.mark.parametrize("tp,what", [
    (3, "--tp 3: must divide the model's 2 KV heads or be a multiple of them"),
    (8, "--tp 8: must divide the model's 4 attention heads"),
    (0, "--tp 0: must be at least 1"),
    ("2 --backend onnx", "--tp 2 with --backend onnx: tensor-parallel engines are built with Inductor only"),
    ("1 --tp-lm-head vocab", "--tp-lm-head vocab: shards over tensor-parallel ranks; it needs --tp N with N > 1"),
])
def test_spec_compile_bad_tp_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys, tp, what):
    from spec_compiler.cli import compile_main

    out = tmp_path / "e"
    argv = [str(tiny_dir), "--tree", "chain-0", "--out", str(out), "--tp", *str(tp).split()]
    assert compile_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {what}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_spec_run_more_ranks_than_gpus_is_one_line(inductor_tp2, monkeypatch, capsys):
    """A CUDA TP engine on a machine with fewer GPUs than ranks (the check before any rank starts)."""
    from spec_compiler.runtime import tp

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    from spec_compiler.errors import SpecCompileError

    with pytest.raises(SpecCompileError, match="needs 2 GPUs, 1 are visible"):
        tp.launch("spec_compiler.cli:run_main", [], 2, "cuda")


def test_spec_serve_tp2_greedy_completion(inductor_tp2, gqa):
    """Rank 0 serves; the other rank makes its engine calls; the completion is transformers'
    greedy continuation; SIGTERM stops both ranks (exit 0)."""
    tok = load_tokenizer(inductor_tp2 / "tokenizer", "test")
    server = ServerProcess(inductor_tp2, "--served-model-name", "tiny")
    try:
        for text in ("hello", "The sea is blue."):
            body = json.dumps({"model": "tiny", "prompt": text, "max_tokens": N_NEW, "temperature": 0})
            req = urllib.request.Request(server.url + "/v1/completions", body.encode(),
                                         {"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
            want = hf_greedy(gqa[0], list(tok(text)["input_ids"]), N_NEW)
            assert reply["choices"][0]["text"] == decode(tok, want)
            assert reply["usage"]["completion_tokens"] == len(want)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.rest_of_log()
    finally:
        server.kill()


def test_a_lowering_worker_outside_any_group_lowers_collectives(tmp_path, monkeypatch):
    """A spawned lowering worker is in no process group, also when the compile that started it
    is (a one-rank NCCL group on a GPU machine). A graph with all-reduces, lowered there at TP 1,
    gets a stand-in group; the artifact then runs in a real group and reduces."""
    import torch.distributed as dist

    from spec_compiler.export.lower import has_collectives, lower_saved, save_exported
    from spec_compiler.passes.tensor_parallel import all_reduce
    from spec_compiler.runtime.tp import free_port

    class Reduce(torch.nn.Module):
        def forward(self, x):
            return all_reduce(x * 2) + 1

    gm = torch.fx.symbolic_trace(Reduce())
    assert has_collectives(gm.graph) and not has_collectives(torch.fx.symbolic_trace(torch.nn.ReLU()).graph)
    assert not dist.is_initialized()
    src, _ = save_exported(gm, [torch.randn(4, 8)], tmp_path / "g.export.pt2")
    package = lower_saved(src, str(tmp_path / "g.pt2"), "cpu", tp=1)
    assert not dist.is_initialized()  # the stand-in group is gone
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        x = torch.randn(4, 8)
        out = torch._inductor.aoti_load_package(package)(x)
        torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, x * 2 + 1)
    finally:
        dist.destroy_process_group()


def test_a_worker_error_that_does_not_pickle_reaches_the_parent_as_text():
    import pickle
    import types

    from spec_compiler.export.lower import picklable

    plain = ValueError("bad shape")
    assert picklable(plain) is plain

    class Holding(Exception):  # like Inductor's errors that keep a frame
        def __init__(self, msg):
            super().__init__(msg)
            self.frame = types.SimpleNamespace(f=sys._getframe())

    try:
        raise Holding("lowering failed")
    except Holding as e:
        err = picklable(e)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, RuntimeError) and str(back) == "Holding: lowering failed"
    assert "raise Holding" in "".join(back.__notes__)


@pytest.mark.gpu
def test_collectives_in_a_world_size_1_nccl_group_capture_and_replay(tmp_path, tiny_dir, tiny_draft_dir,
                                                                       monkeypatch):
    """A CUDA engine whose target graphs carry the all-reduces (the pass at TP 1, in a one-rank
    NCCL group): it loads, each step is one CUDA-graph replay with no host sync, and it gives
    transformers' greedy tokens."""
    import functools

    import torch.distributed as dist

    from spec_compiler import pipeline
    from spec_compiler.passes.tensor_parallel import tensor_parallel
    from spec_compiler.runtime import Engine
    from spec_compiler.runtime.tp import free_port
    from test_gpu_runtime import PROMPT, steps_without_sync

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        monkeypatch.setattr(pipeline, "shard_pass", lambda cfg, graph: functools.partial(
            tensor_parallel, model=cfg.model, tp=1) if graph in ("prefill", "verify", "verify_sampled") else None)
        engine_dir = build_engine(tmp_path / "e", tiny_dir, draft_dir=tiny_draft_dir, backend="inductor",
                                  device="cuda", max_seq_len=256, tree="chain-3")
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        assert manifest["graphs"]["verify"]["pass_counts"]["tensor_parallel"] == 4  # 2 layers x (o, down)
        engine = Engine.load(engine_dir)
        assert engine.generate(PROMPT, max_new_tokens=40).output_ids == hf_greedy(tiny_dir, PROMPT, 40)
        engine.capture()
        engine.start(PROMPT)
        assert len(steps_without_sync(engine, 6)) == 6
    finally:
        dist.destroy_process_group()


def cuda_rank_main(argv: list[str]) -> int:
    """One CUDA rank: greedy tokens, and the number of replays over 6 steps with no host sync."""
    from spec_compiler.runtime import Engine
    from spec_compiler.runtime import tp as ranks
    from test_gpu_runtime import PROMPT, steps_without_sync

    engine_dir, out_dir, tp = Path(argv[0]), Path(argv[1]), int(argv[2])
    rank = ranks.join(tp, "cuda")
    engine = Engine.load(engine_dir)
    tokens = engine.generate(PROMPT, max_new_tokens=40).output_ids
    engine.capture()
    engine.start(PROMPT)
    replays = len(steps_without_sync(engine, 6))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"greedy": tokens, "replays": replays}))
    return 0


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.parametrize("lm_head", ["replicated", "vocab"])
def test_tp2_on_two_gpus_token_identical_one_replay_per_step(tmp_path, tiny_dir, tiny_draft_dir, monkeypatch,
                                                             lm_head):
    """TP 2 over NCCL, float32: TP 1's (transformers') greedy tokens on both ranks, and each step
    one CUDA-graph replay (NCCL all-reduces, and with a vocabulary-sharded lm_head the logits'
    all-gather, inside) without a host sync."""
    from spec_compiler.runtime.tp import launch
    from test_gpu_runtime import PROMPT

    engine = build_engine(tmp_path / "e", tiny_dir, draft_dir=tiny_draft_dir, backend="inductor",
                          device="cuda", dtype="float32", max_seq_len=256, tp=2, tp_lm_head=lm_head)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    assert launch("test_tp:cuda_rank_main", [str(engine), str(tmp_path), "2"], 2, "cuda") == 0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == {"greedy": hf_greedy(tiny_dir, PROMPT, 40), "replays": 6}
