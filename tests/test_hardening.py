"""Issue 9's hostile inputs, one row each, through the real entry points (in-process, so the
table stays fast): each is one clean error (exit 2, exactly one `error:` line naming the problem,
no traceback, nothing left behind). Row ids start with the issue's class:
  2  work before validation: sizes checked before anything is built, every JSON read bounded
  3  engines that compile but cannot run: what the runtime needs is checked at compile time
  4  tracebacks instead of error lines: config fields by type and range, weights, output
     locations, flags; anything else unexpected is one `internal error` line (exit 1)
  5  numbers: non-finite weights (named), rope parameters
  8  smaller: strict parsing, messages that say what was found
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import add_tiny_tokenizer, build_engine, copy_draft
from spec_compiler.cli import compile_main, run_main
from spec_compiler.errors import SpecCompileError

COMMON = ["--backend", "eager", "--tree", "chain-2", "--max-seq-len", "64", "--prefill-chunk", "8"]
DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit
NESTED = "[" * 100 + "]" * 100  # parses, but nests far deeper than any real file


def one_error(capsys, rc: int, words=(), absent=(), code: int = 2) -> str:
    err = capsys.readouterr().err
    assert rc == code, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    for w in absent:
        assert w not in lines[0], (w, lines[0])
    return lines[0]


def tree_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---- how rows break a checkpoint ----

def config(file: str = "config.json", **kv):
    """Set (None: delete) fields of MODEL/config.json (or another JSON file of the model)."""
    def edit(ctx):
        path = ctx.model / file
        d = json.loads(path.read_text())
        for k, v in kv.items():
            d.pop(k) if v is None else d.update({k: v})
        path.write_text(json.dumps(d))
    return edit


def draft_config(src: str = "draft_src", **kv):
    """The draft (`src`: or the hot-vocabulary one) with config.json fields set (None: deleted)."""
    def edit(ctx):
        ctx.draft = copy_draft(getattr(ctx, src), ctx.tmp / "edited_draft", **kv)
    return edit


def raw_json(file: str, text: str, where: str = "model"):
    """Insert `"deep": TEXT` into a JSON object file of the model or the draft."""
    def edit(ctx):
        path = (ctx.model if where == "model" else ctx.draft) / file
        path.write_text(path.read_text().rstrip()[:-1] + f', "deep": {text}}}')
    return edit


def weights(fn, where: str = "model"):
    def edit(ctx):
        path = (ctx.model if where == "model" else ctx.draft) / "model.safetensors"
        st = load_file(path)
        fn(st)
        save_file({k: v.contiguous() for k, v in st.items()}, str(path))
    return edit


def set_(name, fn):
    return lambda st: st.update({name: fn(st[name])})


def poke(name, index, value):
    def fn(st):
        st[name][index] = value
    return fn


def sharded(index_text: str | None = None):
    """The model as one shard plus an index (its text `index_text`, or a valid one)."""
    def edit(ctx):
        names = list(load_file(ctx.model / "model.safetensors"))
        (ctx.model / "model.safetensors").rename(ctx.model / "model-00001-of-00001.safetensors")
        valid = json.dumps({"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors"
                                                           for n in names}})
        (ctx.model / "model.safetensors.index.json").write_text(index_text or valid)
    return edit


def tree_file(text: str):
    def edit(ctx):
        path = ctx.tmp / "tree.json"
        path.write_text(text)
        return ["--tree", path]
    return edit


def flags(*argv):
    return lambda ctx: list(argv)


def tokenizer(template=None, corrupt=False):
    def edit(ctx):
        add_tiny_tokenizer(ctx.model, **({} if template is None else {"chat_template": template}))
        if corrupt:
            (ctx.model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": ')
    return edit


def out_under_a_file(ctx):
    (ctx.tmp / "a_file").write_text("x")
    return ["--out", ctx.tmp / "a_file" / "engine"]


def out_dangling_symlink(ctx):
    os.symlink(ctx.tmp / "nowhere", ctx.tmp / "link")
    return ["--out", ctx.tmp / "link"]


def debug_dir_is_a_file(ctx):
    (ctx.tmp / "a_file").write_text("x")
    return ["--debug-dir", ctx.tmp / "a_file"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def pickled_draft(data: bytes):
    """A pytorch_model.bin that the weights-only unpickler refuses (torch's message wraps the
    reason in a page of advice, with terminal escape codes)."""
    def edit(ctx):
        (ctx.draft / "model.safetensors").unlink()
        (ctx.draft / "pytorch_model.bin").write_bytes(data)
    return edit


# id -> (break it, words the error line must hold, words it must not)
COMPILE_CASES = {
    # 2: sizes before building; bounded JSON
    "2-deep-config": (raw_json("config.json", DEEP), ["config.json", "nested deeper than 32"], []),
    "2-nested-config": (raw_json("config.json", NESTED), ["config.json", "nested deeper than 32"], []),
    "2-deep-draft-config": (raw_json("config.json", DEEP, "draft"), ["draft", "nested deeper"], []),
    "2-deep-tree-file": (tree_file(DEEP), ["--tree", "tree.json", "nested deeper"], []),
    "2-deep-shard-index": (sharded('{"weight_map": ' + DEEP + "}"), ["index.json", "nested deeper"], []),
    "2-huge-tree-file": (tree_file("[[0]]" + " " * (17 << 20)), ["tree.json", "larger than 16 MiB"], []),
    # 3: what the runtime needs, checked at compile time
    "3-prefill-chunk-0": (flags("--prefill-chunk", "0"), ["--prefill-chunk 0", "1024"], []),
    "3-eos-strings": (config(eos_token_id=["2"]), ["eos_token_id=['2']", "token id"], []),
    "3-eos-outside-vocab": (config(eos_token_id=[2, 500]), ["eos_token_id=[2, 500]", "[0, 128)"], []),
    "3-corrupt-tokenizer": (tokenizer(corrupt=True), ["tokenizer.json", "cannot load the tokenizer"], []),
    "3-chat-template-raises": (tokenizer("{{ raise_exception('no chat here') }}"),
                               ["chat template", "no chat here"], []),
    "3-chat-template-syntax": (tokenizer("{% for %}"), ["chat template", "TemplateSyntaxError"], []),
    # 4: config values by type and range
    "4-eps-string": (config(rms_norm_eps="1e-5"), ["rms_norm_eps='1e-5'", "number"], []),
    "4-bool-string": (config(tie_word_embeddings="false"), ["tie_word_embeddings='false'", "true or false"], []),
    "4-heads-string": (config(num_attention_heads="4", head_dim=None), ["num_attention_heads='4'"], []),
    "4-max-positions-string": (config(max_position_embeddings="4096"), ["max_position_embeddings='4096'"], []),
    "4-architectures-int": (config(architectures=5), ["architectures=5", "list"], []),
    "4-rope-scaling-string": (config(rope_parameters=None, rope_scaling="llama3"), ["rope_scaling='llama3'"], []),
    "4-llama3-without-factor": (config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
                                ["rope_parameters.factor", "missing"], []),
    "4-draft-zero-heads": (draft_config(num_attention_heads=0, head_dim=None),
                           ["draft", "num_attention_heads=0"], []),
    # 4: weights
    "4-int-weight": (weights(set_("model.norm.weight", lambda t: t.long())), ["norm.weight", "int64"], []),
    "4-bool-weight": (weights(set_("model.norm.weight", lambda t: t > 0)), ["norm.weight", "bool"], []),
    "4-shard-index-list": (sharded("[1, 2]"), ["index.json", "JSON object"], []),
    "4-shard-index-int-names": (sharded('{"weight_map": {"model.norm.weight": 5}}'), ["weight_map"], []),
    # 4: flags and output locations, before any work
    "4-out-under-a-file": (out_under_a_file, ["--out", "a_file is not a directory"], []),
    "4-out-dangling-symlink": (out_dangling_symlink, ["--out", "dangling symbolic link"], []),
    "4-debug-dir-is-a-file": (debug_dir_is_a_file, ["--debug-dir", "not a directory"], []),
    "4-negative-prefill-chunk": (flags("--prefill-chunk", "-3"), ["--prefill-chunk -3"], []),
    "4-max-seq-len-1e9": (flags("--max-seq-len", "1000000000"),
                          ["--max-seq-len 1000000000", "GiB", "at most about"], []),
    "4-device-cuda-without-cuda": (flags("--device", "cuda"), ["--device cuda", "no CUDA"], []),
    # 5: numbers
    "5-nan-fused-projection": (weights(poke("model.layers.0.self_attn.q_proj.weight", (0, 0), float("nan"))),
                               ["layers.0.self_attn.q_proj.weight", "NaN"], ["differs"]),
    "5-nan-norm": (weights(poke("model.norm.weight", 3, float("nan"))), ["norm.weight", "NaN"], []),
    "5-inf-embedding": (weights(poke("model.embed_tokens.weight", (5, 1), float("inf"))),
                        ["embed_tokens.weight", "Inf"], []),
    "5-nan-draft-weight": (weights(poke("fc.weight", (0, 0), float("nan")), "draft"), ["fc.weight", "NaN"], []),
    "5-eps-nan": (raw_json("config.json", "NaN"), ["config.json", "NaN is not JSON"], []),
    "5-rope-factor-0": (config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0}),
                        ["rope_parameters.factor=0", "> 0"], []),
    "5-rope-theta-negative": (config(rope_parameters={"rope_type": "default", "rope_theta": -5.0}),
                              ["rope_theta=-5.0", "> 0"], []),
    "5-llama3-band-inverted": (config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                       "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
                               ["low_freq_factor=4.0", "high_freq_factor=1.0"], []),
    # 8: strict parsing, messages that say what was found
    "8-tree-rank-true": (tree_file("[[0], [true]]"), ["[True]", "integer ranks"], []),
    "8-tree-path-of-lists": (tree_file("[[[0]]]"), ["[[0]]", "integer ranks"], []),
    "8-rank-above-vocab-full-draft": (tree_file("[[0], [200]]"), ["rank 200", "128 tokens"], ["--draft-vocab"]),
    "8-vocab-size-true": (config(vocab_size=True), ["config.json", "vocab_size=True"], ["the target's is"]),
    "8-draft-vocab-size-string": (draft_config("hot_src", draft_vocab_size="48"), ["draft_vocab_size='48'"], []),
    "8-newline-in-path": (lambda ctx: ["--draft", ctx.tmp / "no\nsuch"], ["no\\nsuch", "no such directory"], []),
    "8-unpickling-blocked-global": (pickled_draft(pickle.dumps(_Evil(), protocol=2)),
                                    ["pytorch_model.bin", "refused it: Trying to load unsupported GLOBAL "
                                     f"{os.system.__module__}.system whose module "
                                     f"{os.system.__module__} is blocked); the file is corrupt"],
                                    ["In PyTorch 2.6"]),
    "8-unpickling-escape-codes": (pickled_draft(b"c\x1b[31mevil_module\nboom\n(tR."),
                                  ["pytorch_model.bin", "GLOBAL evil_module.boom was not an allowed global"],
                                  ["\x1b", "[1m", "[31m", "two options"]),
}


class Ctx:
    def __init__(self, tmp: Path, tiny_dir: Path, draft_dir: Path, hot_dir: Path):
        self.tmp, self.draft_src, self.hot_src = tmp, draft_dir, hot_dir
        self.model = shutil.copytree(tiny_dir, tmp / "model")
        self.draft = shutil.copytree(draft_dir, tmp / "draft")


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_bad_compile_input(case, tmp_path, tiny_dir, tiny_draft_dir, tiny_hot_draft_dir, capsys):
    if case == "4-device-cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ctx = Ctx(tmp_path, tiny_dir, tiny_draft_dir, tiny_hot_draft_dir)
    breaker, words, absent = COMPILE_CASES[case]
    extra = breaker(ctx) or []
    before = tree_of(tmp_path)
    argv = [ctx.model, "--draft", ctx.draft, "--out", tmp_path / "engine", *COMMON, *extra]
    one_error(capsys, compile_main([str(a) for a in argv]), words, absent)
    assert tree_of(tmp_path) == before  # nothing left behind (no engine, no temporaries)


@pytest.mark.parametrize("case, words", [
    ("chain-200000", ["tree 'chain-200000' has 200001 nodes", "at most 1024"]),
    ("chain-99999999999", ["tree 'chain-99999999999' has 100000000000 nodes"]),
    ("layers-2^31", ["caches and buffers would take", "too large", "num_hidden_layers=2147483647"]),
], ids=["2-chain-200000", "2-chain-99999999999", "2-config-2^31-layers"])
def test_hostile_sizes_cost_bounded_time_and_memory(tmp_path, tiny_dir, tiny_draft_dir, case, words):
    """Sizes are checked before anything is built: chain-K's paths grow with K^2, and layers
    cost time each even on the meta device. Run in a child with 4 GiB of address space and a
    time limit, so a regression fails instead of taking the machine down."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    model, tree = tiny_dir, case
    if case.startswith("layers"):
        model, tree = shutil.copytree(tiny_dir, tmp_path / "model"), "chain-2"
        config(num_hidden_layers=2**31 - 1)(type("Ctx", (), {"model": model}))
    code = "import sys; from spec_compiler.cli import compile_main; sys.exit(compile_main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, str(model), "--draft", str(tiny_draft_dir),
                        "--out", str(tmp_path / "e"), *COMMON, "--tree", tree],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), r.stderr[-2000:]
    assert not (tmp_path / "e").exists()


def test_read_only_output_location(tmp_path, tiny_dir, tiny_draft_dir, capsys, monkeypatch):
    """A filesystem that refuses writes is found before compiling (simulated: mkdir fails with
    EROFS, as on a read-only mount), not after the whole compile."""
    from spec_compiler import pipeline

    def read_only(path, mode=0o777, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(pipeline, "compile_engine", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(os, "mkdir", read_only)
    rc = compile_main([str(tiny_dir), "--draft", str(tiny_draft_dir), "--out", str(tmp_path / "ro" / "e"),
                       *COMMON])
    monkeypatch.undo()
    one_error(capsys, rc, ["--out", "cannot write in", "Read-only file system"])
    assert tree_of(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_directory(tmp_path, tiny_dir, tiny_draft_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    rc = compile_main([str(tiny_dir), "--draft", str(tiny_draft_dir), "--out", str(locked / "e"), *COMMON])
    one_error(capsys, rc, ["--out", "cannot write in"])


def test_internal_error_is_one_line_and_verbose_shows_the_traceback(tmp_path, tiny_dir, capsys, monkeypatch):
    from spec_compiler import pipeline

    def bug(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(pipeline, "compile_engine", bug)
    argv = [str(tiny_dir), "--tree", "chain-0", "--out", str(tmp_path / "e"), "--backend", "eager"]
    line = one_error(capsys, compile_main(argv), code=1)
    assert line == ("error: internal error: RuntimeError: something unexpected; rerun with --verbose "
                    "for the traceback")
    assert compile_main([*argv, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in bug" in err and err.rstrip().endswith(
        "error: internal error: RuntimeError: something unexpected")


def test_draft_fc_bias_comes_from_the_weights(tmp_path, tiny_dir, tiny_draft_dir):
    """The manifest records fc_bias as the weights have it, whatever the draft's config says."""
    for bias, edit, want in ((False, None, True), (True, lambda st: st.pop("fc.bias"), False)):
        d = copy_draft(tiny_draft_dir, tmp_path / f"d{want}", edit, bias=bias)
        out = tmp_path / f"e{want}"
        assert compile_main([str(tiny_dir), "--draft", str(d), "--out", str(out), *COMMON]) == 0
        assert json.loads((out / "manifest.json").read_text())["draft"]["fc_bias"] is want


# ---- spec-run and Engine ----

BOOM_TEMPLATE = ("{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('no boom "
                 "please') }}{% endif %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_dir, tiny_draft_dir) -> Path:
    """An engine with a tokenizer whose chat template refuses prompts that say 'boom'."""
    root = tmp_path_factory.mktemp("hardening")
    model = root / "model"
    shutil.copytree(tiny_dir, model)
    add_tiny_tokenizer(model, BOOM_TEMPLATE)
    return build_engine(root / "engine", model, tree="chain-2", draft_dir=tiny_draft_dir,
                        max_seq_len=64, chunk=8)


def _manifest(text: str):
    return lambda d: (d / "manifest.json").write_text(text)


def _schema_version(v):
    def edit(d):
        m = json.loads((d / "manifest.json").read_text())
        m["schema_version"] = v
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


# id -> (argv after ENGINE_DIR, engine edit, words, words absent)
RUN_CASES = {
    "4-prompt-not-utf8": (["--prompt", "caf\udce9 hello"], None, ["prompt", "not valid UTF-8"], []),
    "4-manifest-list": (["--prompt-ids", "1"], _manifest("[]"), ["manifest.json", "JSON object"], []),
    "3-chat-template-raises-on-this-prompt": (["--prompt", "boom"], None, ["chat template", "no boom please"], []),
    "8-prompt-ids-underscore": (["--prompt-ids", "1_2"], None, ["--prompt-ids", "'1_2'"], []),
    "8-prompt-ids-other-digits": (["--prompt-ids", "\u0661,\u0662"], None, ["--prompt-ids", "not a token id"], []),
    "8-prompt-ids-plus": (["--prompt-ids", "+1,2"], None, ["--prompt-ids", "'+1'"], []),
}
MANIFEST_CASES = {  # read_manifest: the bounded reader (fileio.read_json), the version by repr
    "2-deep-manifest": (["--prompt-ids", "1"], _manifest('{"a": ' + DEEP + "}"), ["manifest.json", "nested deeper"], []),
    "8-schema-version-string": (["--prompt-ids", "1"], _schema_version("2"), ["schema version '2'"], []),
}


@pytest.mark.parametrize("case", [*RUN_CASES, *MANIFEST_CASES])
def test_bad_run_input(case, tmp_path, engine_dir, capsys):
    args, edit, words, absent = {**RUN_CASES, **MANIFEST_CASES}[case]
    d = engine_dir
    if edit is not None:
        d = tmp_path / "engine"
        shutil.copytree(engine_dir, d)
        edit(d)
    one_error(capsys, run_main([str(d), *args, "--max-new-tokens", "3"]), words, absent)


@pytest.fixture(scope="module")
def engine(engine_dir):
    from spec_compiler.runtime import Engine

    return Engine.load(engine_dir)


def test_good_prompts_still_run(engine_dir, engine, capsys):
    assert run_main([str(engine_dir), "--prompt", "hello world", "--max-new-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["output_ids"]) == 3 and isinstance(res["text"], str)
    assert run_main([str(engine_dir), "--prompt-ids", " 5, 6 ,7", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) == 3
    assert len(engine.generate(torch.tensor([5, 6]), max_new_tokens=2).output_ids) == 2  # 1-D tensor
    assert len(engine.generate((5, 6), max_new_tokens=2, sync_every=3).output_ids) == 2


@pytest.mark.parametrize("call, words", [
    (lambda e: e.generate("567", max_new_tokens=2), ["got a str", "'567'"]),
    (lambda e: e.generate([5, True, 7], max_new_tokens=2), ["True", "not an integer"]),
    (lambda e: e.generate([5, 6.0], max_new_tokens=2), ["6.0", "not an integer"]),
    (lambda e: e.generate(5, max_new_tokens=2), ["int"]),
    (lambda e: e.generate([5, 6], max_new_tokens=2, sync_every=0), ["sync_every=0"]),
    (lambda e: e.generate([5, 6], max_new_tokens="2"), ["'2'"]),
], ids=["8-string-prompt", "8-bool-token", "8-float-token", "8-int-prompt", "8-sync-every-0",
        "8-max-new-tokens-string"])
def test_bad_generate_call(engine, call, words):
    with pytest.raises(SpecCompileError) as e:
        call(engine)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
