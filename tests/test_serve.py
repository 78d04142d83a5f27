"""spec-serve against a real server process on 127.0.0.1, with the official `openai` client (and
raw HTTP for malformed input). The engine: the tiny model (eager, 4 slots) with a byte-level
tokenizer, so its random outputs include multi-byte and invalid UTF-8 (incremental decoding is
exercised), and the reference is `Engine.generate` in this process on the same engine.

Greedy responses equal Engine.generate's text and token counts, streamed or not, alone or 16
at once; stop strings cut the text and are never streamed; seeded sampling replays; every bad
request gets its status and OpenAI error type and the server keeps serving; a full queue gets
429 and dropped streams free their slots; a load of 200 requests (some dropped mid-stream) all
complete and /metrics counts them; SIGTERM drains and exits 0.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
import signal
import socket
import threading
import time

import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from helpers import build_engine, make_random_draft, make_tiny_checkpoint  # noqa: E402
from serve_helpers import ServerProcess, add_byte_tokenizer  # noqa: E402
from spec_compiler.chat import encode_messages  # noqa: E402
from spec_compiler.errors import SpecCompileError  # noqa: E402
from spec_compiler.runtime import Engine  # noqa: E402
from spec_compiler.serve import TextStream, main  # noqa: E402

MODEL = "tiny-byte"
SEQ_LEN = 128
PROMPTS = ["hello", "The sea is blue.", "Can you write one short sentence?", "é€ü", "a", "1, 2, 3,",
           "tea or coffee", "why?", "Ünïcödé ☃", "zzz", "the end", "What is 2+2?", "sky", "rain",
           "ok", "A long prompt that takes more than one prefill chunk of sixteen tokens."]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_checkpoint(root / MODEL, vocab_size=260, eos_token_id=257, bos_token_id=256)
    add_byte_tokenizer(model)
    draft = make_random_draft(root / "draft", model)
    return build_engine(root / "engine", model, tree="chain-2", draft_dir=draft, max_batch=4,
                        max_seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def engine(engine_dir):
    """The reference, in this process, on one torch thread while this module runs (the server
    process has the other core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.load(engine_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine_dir):
    s = ServerProcess(engine_dir, "--served-model-name", MODEL)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def solo(engine, ids, max_new=None, **kw):
    """(text, completion tokens, finish_reason) of Engine.generate alone."""
    r = engine.generate(ids, max_new_tokens=max_new, **kw)
    return engine.decode(r.output_ids), len(r.output_ids), "stop" if r.stop_reason == "eos" else "length"


def prompt_ids(engine, text):
    return list(engine.tokenizer(text)["input_ids"])


def chat_ids(engine, messages):
    return encode_messages(engine.tokenizer, messages)


class Reply:
    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None) -> Reply:
    """One plain HTTP request (urllib): its status and body, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def metrics(server) -> dict[str, float]:
    text = http("GET", server.url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)
            if not m.group(1).startswith("#")}


def test_engine_progress_streams_each_slots_tokens(engine):
    """Engine.progress after every step: each live slot's new tokens, which add up to what
    finished() returns (and to each prompt's solo result)."""
    prompts = [prompt_ids(engine, p) for p in PROMPTS[:3]]
    solos = [engine.generate(p, max_new_tokens=9).output_ids for p in prompts]
    with engine.session():
        slots = [engine.admit(p, max_new_tokens=9) for p in prompts]
        got = {s: [] for s in slots}
        final = {}
        while len(final) < len(slots):
            engine.step()
            for s, new in engine.progress({s: len(t) for s, t in got.items()}).items():
                got[s] += new
            final.update(engine.finished())
    for s, want in zip(slots, solos):
        assert final[s].output_ids == want and got[s][:len(want)] == want


def test_text_stream_holds_back_partial_characters_and_stop_strings(engine):
    """Pieces concatenate to the whole decode; an incomplete UTF-8 character and a tail that may
    begin a stop string are not handed out; a stop string cuts the text."""
    tok = engine.tokenizer
    ids = list("héllo € wörld".encode())
    ts = TextStream(engine.decode, [])
    pieces = []
    for t in ids:
        assert ts.add([t]) is None
        pieces.append(ts.piece())
        assert "\ufffd" not in pieces[-1]
    assert ts.finish() is None
    pieces.append(ts.piece(final=True))
    assert "".join(pieces) == tok.decode(ids) == "héllo € wörld"
    ts = TextStream(engine.decode, ["STOP", "wx"])
    out = ""
    for t in "abc STO and STOP more".encode():
        hit = ts.add([t])
        out += ts.piece(final=hit is not None)
        assert "STOP" not in out and not out.endswith(("S", "ST", "STO"))
        if hit is not None:
            break
    assert out == "abc STO and " and hit == len("abc STO and ")


def test_models_health_and_chat_without_template(server, client, tmp_path):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = http("GET", server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    model = make_tiny_checkpoint(tmp_path / "m", vocab_size=260)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(add_byte_tokenizer(model, chat_template=None))
    with pytest.raises(SpecCompileError, match="no chat template"):
        encode_messages(tok, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("max_tokens", [12, None])
def test_completions_equal_engine_generate(engine, client, max_tokens):
    """Greedy completions (the rest of the context when max_tokens is left out), streamed and
    not: the text and usage of Engine.generate; streamed chunks concatenate to the text."""
    for prompt in PROMPTS[:3]:
        ids = prompt_ids(engine, prompt)
        text, n, reason = solo(engine, ids, max_tokens)
        kw = {} if max_tokens is None else {"max_tokens": max_tokens}
        r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)
        assert r.choices[0].text == text and r.choices[0].finish_reason == reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
        assert all(c.usage is None for c in chunks[:-1])
    # token ids as the prompt
    ids = [5, 200, 17]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=7, temperature=0)
    assert r.choices[0].text == solo(engine, ids, 7)[0]


def test_chat_completions_equal_engine_generate(engine, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! €"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And then?"}]
    for messages in (msgs[1:2], msgs):
        ids = chat_ids(engine, messages)
        text, n, reason = solo(engine, ids, 20)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                           temperature=0, user="u1", metadata={"k": "v"})
        assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == reason and r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == n
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                     temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == reason
    # content as a list of text parts
    r = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi! "}, {"type": "text", "text": "€"}]}])
    assert r.choices[0].message.content == solo(engine, chat_ids(engine, msgs[1:2]), 5)[0]


def test_stop_strings_cut_the_text_and_are_never_streamed(engine, client):
    prompt = PROMPTS[1]
    full, _, _ = solo(engine, prompt_ids(engine, prompt), 40)
    clean = [i for i in range(5, len(full) - 3) if "\ufffd" not in full[i:i + 2]]
    assert clean, full
    stop = full[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]
    other = "\x00never"
    want = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[other, stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    chunks = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True)]
    assert "".join(chunks) == want and not any(stop in c for c in chunks)


def test_seeded_sampling_replays_engine_generate(engine, client):
    ids = prompt_ids(engine, PROMPTS[0])
    text = solo(engine, ids, 15, temperature=1.5, top_p=0.9, seed=1234)[0]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=15, temperature=1.5,
                                      top_p=0.9, seed=1234, stream=stream)
        got = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert got == text


def test_sixteen_concurrent_clients_get_their_solo_results(engine, client):
    """Batching changes nothing: 16 clients at once, each its own prompt, through 4 slots."""
    want = {p: solo(engine, prompt_ids(engine, p), 10)[0] for p in PROMPTS}

    def one(i, p):
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=p, max_tokens=10, temperature=0, stream=True))
        return client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, range(16), PROMPTS))
    assert got == [want[p] for p in PROMPTS]


BAD = [  # (path, body (dict, or raw bytes), status, error type, param)
    ("/v1/completions", b"{not json", 400, "invalid_request_error", None),
    ("/v1/completions", b"[1, 2]", 400, "invalid_request_error", None),
    ("/v1/completions", {"prompt": "hi"}, 400, "invalid_request_error", "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "invalid_request_error", "model"),
    ("/v1/completions", {"model": MODEL}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 7}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 999]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "invalid_request_error", "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "invalid_request_error", "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400,
     "invalid_request_error", "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frequency_penalty": -1}, 400,
     "invalid_request_error", "frequency_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 10}}, 400,
     "invalid_request_error", "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400,
     "invalid_request_error", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": SEQ_LEN}, 400,
     "invalid_request_error", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * SEQ_LEN}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400,
     "invalid_request_error", "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400,
     "invalid_request_error", "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "invalid_request_error", "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 1.5}, 400, "invalid_request_error", "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_request_error", "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 3}, 400, "invalid_request_error", "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "invalid_request_error", "stream"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_request_error", "messages[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_request_error", "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400,
     "invalid_request_error", "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
     400, "invalid_request_error", "logprobs"),
    ("/v1/completions", b"{" + b" " * (33 << 20) + b"}", 413, "invalid_request_error", None),
    ("/v1/nothing", {"model": MODEL}, 404, "invalid_request_error", None),
]


@pytest.mark.parametrize("path,body,status,kind,param", BAD, ids=[f"{i}-{b[4] or b[2]}" for i, b in enumerate(BAD)])
def test_bad_request_then_a_good_one(engine, server, client, path, body, status, kind, param):
    r = http("POST", server.url + path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["param"] == param and err["message"]
    if status == 404 and param == "model":
        assert err["code"] == "model_not_found"
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert r.choices[0].text == solo(engine, prompt_ids(engine, "hi"), 2)[0]


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="hi")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert e.value.param == "n"


@pytest.fixture(scope="module")
def small_server(engine_dir):
    """4 slots, one waiting place, an API key from the environment, a short drain on SIGTERM,
    the default model id (the checkpoint's name, from the manifest)."""
    s = ServerProcess(engine_dir, "--max-queue", "1",
                      "--shutdown-timeout", "0.2", env={"SPEC_API_KEY": "sekret"})
    yield s
    s.kill()


def test_api_key(small_server):
    url = small_server.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = http("POST", url, body, headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sekret", max_retries=0)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.completions.create(**body).usage.completion_tokens == 1
    assert http("GET", small_server.url + "/health").status_code == 200  # health needs no key


def test_full_queue_gets_429_and_dropped_streams_free_their_slots(small_server):
    c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sekret", max_retries=0, timeout=120)
    before = metrics(small_server)
    streams = []
    for i in range(5):  # 4 slots + 1 waiting place
        s = c.completions.create(model=MODEL, prompt=f"long {i}", max_tokens=100, temperature=0, stream=True)
        streams.append(s)
        deadline = time.monotonic() + 60  # admitted between two steps (or waiting, the fifth)
        while time.monotonic() < deadline:
            m = metrics(small_server)
            if (m["spec_live_slots"], m["spec_queue_depth"]) == (min(i + 1, 4), max(i - 3, 0)):
                break
            time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=MODEL, prompt="one too many", max_tokens=1)
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    for s in streams[:4]:
        next(iter(s))  # a running slot streams
        s.close()
    streams[4].close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metrics(small_server)
        if m["spec_live_slots"] == 0 and m["spec_queue_depth"] == 0:
            break
        time.sleep(0.05)
    m = metrics(small_server)
    assert (m["spec_live_slots"], m["spec_queue_depth"]) == (0, 0)
    cancelled = 'spec_requests_total{finish_reason="cancelled"}'
    assert m[cancelled] - before[cancelled] == 5
    assert c.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_load_200_requests_32_clients_some_cancelled(engine, server, client):
    """200 requests of random lengths from 32 threads, one in 8 dropped after its first chunk: the
    rest complete with their solo greedy text, each exactly once, the server stays healthy and
    /metrics agrees with what was sent. A dropped request the server had already finished (a
    client thread starved on a busy machine can read its first chunk after the last one was sent)
    ended normally; the books must balance either way, to the token."""
    rng = random.Random(0)
    prompts = PROMPTS[:8]
    refs = {p: engine.generate(prompt_ids(engine, p), max_new_tokens=12).output_ids for p in prompts}
    dropped = prompts[0]  # every dropped request asks for the same thing: its full length is known
    full = engine.generate(prompt_ids(engine, dropped), max_new_tokens=80).output_ids
    full_len = full.index(257) + 1 if 257 in full else len(full)
    reqs = [(i, dropped if i % 8 == 3 else rng.choice(prompts), rng.randint(1, 12), rng.random() < 0.5,
             i % 8 == 3) for i in range(200)]
    before = metrics(server)

    def one(req):
        i, p, n, stream, cancel = req
        if cancel:
            s = client.completions.create(model=MODEL, prompt=p, max_tokens=80, temperature=0, stream=True)
            first = next(iter(s))
            s.close()
            return i, first.id, None, None
        if stream:
            chunks = list(client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            return i, chunks[0].id, "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
        return i, r.id, r.choices[0].text, r.usage

    with cf.ThreadPoolExecutor(32) as ex:
        out = list(ex.map(one, reqs))
    assert [o[0] for o in out] == list(range(200)) and len({o[1] for o in out}) == 200
    tokens = 0
    for (i, p, n, _, cancel), (_, _, text, usage) in zip(reqs, out):
        if cancel:
            continue
        ids = refs[p][:n]
        if 257 in ids:
            ids = ids[:ids.index(257) + 1]
        assert text == engine.decode(ids) and usage.completion_tokens == len(ids), (i, p, n)
        tokens += usage.completion_tokens
    assert http("GET", server.url + "/health").status_code == 200
    answered = [f'spec_http_requests_total{{endpoint="/v1/completions",status="{s}"}}' for s in (200, 499)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server sees the last dropped streams go
        after = metrics(server)
        if not after["spec_live_slots"] and sum(after.get(k, 0) - before.get(k, 0) for k in answered) == 200:
            break
        time.sleep(0.05)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    n_cancel = sum(r[4] for r in reqs)
    cut = delta('spec_requests_total{finish_reason="cancelled"}')  # dropped while still generating
    assert 1 <= cut <= n_cancel
    # every cut request is a 499; a dropped one the engine had just finished may be a 499 too (its
    # client left while the last event was on its way), and nothing else is
    gone = delta('spec_http_requests_total{endpoint="/v1/completions",status="499"}')
    assert cut <= gone <= n_cancel
    assert delta('spec_http_requests_total{endpoint="/v1/completions",status="200"}') == 200 - gone
    done = delta('spec_requests_total{finish_reason="stop"}') + delta('spec_requests_total{finish_reason="length"}')
    assert done == 200 - cut
    assert delta('spec_generation_tokens_total{finish_reason="stop"}') + \
        delta('spec_generation_tokens_total{finish_reason="length"}') == tokens + (n_cancel - cut) * full_len
    assert delta("spec_step_seconds_count") > 0 and after["spec_queue_depth"] == 0
    assert after["spec_live_slots"] == 0 and after["spec_tokens_per_verify_call"] >= 1


@pytest.mark.parametrize("drain", [60.0, 0.0], ids=["finish", "cancel"])
def test_sigterm_drains_and_exits_0(engine_dir, drain):
    """In flight at SIGTERM: with time to drain, every request finishes ("length"); with none,
    what is unfinished is cut at once (its stream ends with a shutting_down error and [DONE]).
    Either way the process exits 0 and every stream is closed properly. Two drains that no machine
    speed can blur: the cancel case queues far more work (64 x 115 tokens over 4 slots) than the
    server can finish between seeing its slots full and handling the signal, so something is
    always still unfinished (one long request alone once finished first)."""
    server = ServerProcess(engine_dir, "--shutdown-timeout", str(drain))
    try:
        url = server.url + "/v1/completions"
        jobs = [("short", 3), ("long", 115)] if drain else [(f"long {i}", 115) for i in range(64)]
        results = {}

        def stream(name, n):
            body = {"model": MODEL, "prompt": name, "max_tokens": n, "temperature": 0, "stream": True}
            results[name] = [line for line in http("POST", url, body).text.splitlines() if line]

        threads = [threading.Thread(target=stream, args=job) for job in jobs]
        for t in threads:
            t.start()
        def submitted():  # queued, in a slot or ended: every request the server has taken
            m = metrics(server)
            return m["spec_queue_depth"] + m["spec_live_slots"] + sum(
                v for k, v in m.items() if k.startswith("spec_requests_total{"))

        deadline = time.monotonic() + 60
        while submitted() < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=90) == 0
        for t in threads:
            t.join(timeout=30)
        assert set(results) == {name for name, _ in jobs}
        for name, _ in jobs:
            assert results[name][-1] == "data: [DONE]", (name, results[name][-2:])
        ends = {name: results[name][-2] for name, _ in jobs}
        if drain:  # both finish
            for name, end in ends.items():
                assert '"finish_reason": "length"' in end, (name, end)
        else:  # each either finished before the signal landed or is cut; some are always cut
            cut = [name for name, end in ends.items() if '"shutting_down"' in end]
            for name, end in ends.items():
                assert name in cut or '"finish_reason": "length"' in end, (name, end)
            assert cut, "nothing was in flight at SIGTERM"
        assert "stopped" in server.rest_of_log()
    finally:
        server.kill()


def test_cli_errors_are_one_line(tmp_path, capsys, engine_dir):
    assert main([str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main([str(engine_dir), "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "\n" not in err
    assert main([str(engine_dir), "--max-queue", "0"]) == 2
