"""spec-serve: an OpenAI-compatible HTTP server (completions, chat completions, streamed as
server-sent events) over one engine's batch slots.

    spec-serve ENGINE_DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
                          [--max-queue 1024] [--api-key KEY]

Threads: aiohttp serves HTTP on an asyncio loop (parsing, validation, tokenizing prompts,
writing responses); one engine thread owns the engine's slots (admit, step, progress, finished,
cancel) and does the per-step host work for every request (incremental detokenizing, stop
strings), handing text to each request's asyncio queue. Why a thread and not a coroutine: a
step blocks for its whole device time, and the loop must keep accepting, validating and
streaming meanwhile; one thread, because the engine has one set of slot state.

Between steps the engine thread cancels what clients dropped, admits queued requests into free
slots (first come, first served) and, after the step, reads every live slot's new tokens.
Requests beyond the slots wait in a bounded queue (--max-queue; past it: 429). SIGTERM (or
SIGINT): new requests get 503, in-flight ones get --shutdown-timeout seconds to finish, the rest
are cancelled, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .cli import add_tp_flag
from .errors import SpecCompileError, add_verbose_flag, brief, cli_entry

log = logging.getLogger("spec_compiler.serve")

MAX_STOP = 4
MAX_BODY = 32 << 20  # bytes of one request body (413 past it)
# Fields that would change the output but are not implemented: a request that sets one (to
# anything but its no-op value) gets 400 naming it, rather than an answer that ignores it.
UNSUPPORTED = {  # field -> its no-op values
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "repetition_penalty": (None, 1), "logit_bias": (None, {}),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "min_tokens": (None, 0),
    "response_format": (None, {"type": "text"}), "prediction": (None,), "audio": (None,),
    "modalities": (None, ["text"]),
}
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- metrics ----
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Counters and gauges in Prometheus' text exposition format. A dozen lines of text, written
    here rather than through prometheus_client: one dependency less for a fixed, small set."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http = collections.Counter()  # (endpoint, status) -> requests answered
        self.finished = collections.Counter()  # finish reason (stop, length, cancelled, error)
        self.prompt_tokens = 0
        self.generated = collections.Counter()  # finish reason -> completion tokens
        self.verify_calls = 0
        self.verified_tokens = 0  # tokens emitted by those verify calls
        self.step_count, self.step_sum = 0, 0.0
        self.step_buckets = [0] * len(STEP_BUCKETS)

    def step(self, seconds: float) -> None:
        with self.lock:
            self.step_count += 1
            self.step_sum += seconds
            for i, b in enumerate(STEP_BUCKETS):
                if seconds <= b:
                    self.step_buckets[i] += 1

    def text(self, queue_depth: int, live: int, slots: int) -> str:
        with self.lock:
            out = []

            def metric(name, kind, help, samples):
                out.append(f"# HELP {name} {help}\n# TYPE {name} {kind}")
                out.extend(f"{name}{labels} {value}" for labels, value in samples)

            metric("spec_http_requests_total", "counter", "HTTP requests answered, by endpoint and status",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.http.items())])
            metric("spec_requests_total", "counter", "generation requests ended, by finish reason",
                   [(f'{{finish_reason="{r}"}}', self.finished[r]) for r in ("stop", "length", "cancelled", "error")])
            metric("spec_prompt_tokens_total", "counter", "prompt tokens of admitted requests",
                   [("", self.prompt_tokens)])
            metric("spec_generation_tokens_total", "counter", "completion tokens, by finish reason",
                   [(f'{{finish_reason="{r}"}}', self.generated[r]) for r in ("stop", "length", "cancelled", "error")])
            metric("spec_verify_calls_total", "counter", "verify calls of finished requests", [("", self.verify_calls)])
            metric("spec_tokens_per_verify_call", "gauge", "tokens emitted per verify call (finished requests)",
                   [("", self.verified_tokens / self.verify_calls if self.verify_calls else 0.0)])
            buckets = [(f'_bucket{{le="{b}"}}', n) for b, n in zip(STEP_BUCKETS, self.step_buckets)]
            metric("spec_step_seconds", "histogram", "engine step time (prefill chunks + one speculative step)",
                   buckets + [('_bucket{le="+Inf"}', self.step_count), ("_sum", self.step_sum),
                              ("_count", self.step_count)])
            metric("spec_queue_depth", "gauge", "requests waiting for a slot", [("", queue_depth)])
            metric("spec_live_slots", "gauge", "slots holding a request", [("", live)])
            metric("spec_slots", "gauge", "slots of the engine (--max-batch)", [("", slots)])
            return "\n".join(out) + "\n"


# ---- text ----
class TextStream:
    """One request's output ids -> text, handed out in pieces whose concatenation is exactly the
    final text. Ids are decoded incrementally over a short window (as vLLM does), so a step
    costs the new tokens, not the whole output; a piece is held back while it ends in an
    incomplete UTF-8 character (U+FFFD), and while its tail could begin a stop string. At the
    end the whole output is decoded once: that is the text (what `Engine.decode` gives), and the
    last piece is the rest of it."""

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters)
        self.sent = 0  # characters of `text` handed out
        self.prefix, self.read = 0, 0  # the decode window: ids[prefix:read] is context only

    def add(self, ids: list[int]) -> int | None:
        """Append ids; returns where a stop string starts in `text`, if one now does (the text is
        cut there)."""
        if not ids:
            return None
        self.ids += ids
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.find_stop()

    def find_stop(self) -> int | None:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return min(hits)
        return None

    def finish(self) -> int | None:
        """The whole output decoded (the final text); returns a stop string's start, as add()."""
        full = self.decode(self.ids)
        if full.startswith(self.text[:self.sent]):
            self.text = full
        return self.find_stop()

    def piece(self, final: bool = False) -> str:
        """The text not yet handed out, less (unless final) what could still change: an
        incomplete character, or a tail that is the beginning of a stop string."""
        end = len(self.text)
        if not final:  # hold back the longest tail that begins a stop string
            longest = min(end - self.sent, max(map(len, self.stop), default=1) - 1)
            end -= next((k for k in range(longest, 0, -1)
                         if any(s.startswith(self.text[end - k:]) for s in self.stop)), 0)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


# ---- requests ----
@dataclass
class Job:
    """One generation request, shared by its HTTP handler (the loop) and the engine thread."""

    prompt_ids: list[int]
    max_new: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stream: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    slot: int | None = None
    n_read: int = 0  # output tokens read from the engine so far
    cancelled: bool = False
    ended: bool = False

    def post(self, *event) -> None:
        """Hand an event to the request's handler: ("text", str) ... then one ("end", reason,
        completion_tokens) or ("error", APIError)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """The engine thread: admits queued jobs into free slots between steps, steps the batch,
    and streams each slot's new text to its job (module docstring)."""

    def __init__(self, engine, max_queue: int, metrics: Metrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.cancels: list[Job] = []
        self.slots: dict[int, Job] = {}
        self.draining = False  # no new jobs (SIGTERM)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="spec-serve-engine", daemon=True)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.draining:
                raise APIError(503, "the server is shutting down; retry elsewhere", "server_error",
                               code="shutting_down")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the request queue is full ({self.max_queue} waiting); retry "
                                    "later", "rate_limit_error", code="queue_full")
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or its slot at the next step."""
        with self.cond:
            if not job.ended and not job.cancelled:
                job.cancelled = True
                self.cancels.append(job)
                self.cond.notify()

    def depth(self) -> tuple[int, int]:
        with self.cond:
            return len(self.waiting), len(self.slots)

    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not self.slots

    def stop(self) -> None:
        """End the thread: every job still queued or in a slot ends as cancelled."""
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()

    def _end(self, job: Job, reason: str, error: APIError | None = None) -> None:
        job.ended = True
        if job.slot is not None:
            self.slots.pop(job.slot, None)
        with self.metrics.lock:
            self.metrics.finished[reason] += 1
            self.metrics.generated[reason] += job.n_read
        if error is not None:
            job.post("error", error)
        else:
            job.post("end", reason, job.n_read)

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self.cond:
                while not (self.waiting or self.slots or self.cancels or self.stopped):
                    self.cond.wait()
                cancels, self.cancels = self.cancels, []
                if self.stopped:
                    cancels += [j for j in (*self.waiting, *self.slots.values()) if not j.ended]
                    self.waiting.clear()
                admit = []
                free = eng.free_slots() + sum(1 for j in cancels if j.slot is not None and not j.ended)
                while self.waiting and len(admit) < free:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admit.append(job)
            gone = APIError(503, "the server stopped before this request finished", "server_error",
                            code="shutting_down") if self.stopped else None
            for job in cancels:
                if job.ended:
                    continue
                if job.slot is not None:
                    eng.cancel(job.slot)
                self._end(job, "cancelled", gone)
            if self.stopped:
                return
            for job in admit:
                try:
                    job.slot = eng.admit(job.prompt_ids, job.max_new, job.temperature, job.top_p,
                                         job.top_k, job.seed)
                except SpecCompileError as e:  # checked before queueing; this is a fallback
                    self._end(job, "error", bad(None, str(e)))
                    continue
                with self.cond:
                    self.slots[job.slot] = job
                with self.metrics.lock:
                    self.metrics.prompt_tokens += len(job.prompt_ids)
            if not self.slots:
                continue
            try:
                t0 = time.perf_counter()
                eng.step()
                since = {s: j.n_read for s, j in self.slots.items()}
                new = eng.progress(since)
                done = eng.finished()
                self.metrics.step(time.perf_counter() - t0)
                self._deliver(new, done)
            except Exception as e:  # a bug: fail what runs, keep serving
                log.exception("engine step failed")
                for slot, job in list(self.slots.items()):
                    try:
                        eng.cancel(slot)
                    except SpecCompileError:
                        pass
                    self._end(job, "error", APIError(500, f"internal error: {brief(e)}", "server_error"))

    def _deliver(self, new: dict[int, list[int]], done: dict) -> None:
        for slot, job in list(self.slots.items()):
            res = done.get(slot)
            if res is not None:
                ids = res.output_ids[job.n_read:]
                reason = "stop" if res.stop_reason == "eos" else "length"
                with self.metrics.lock:
                    self.metrics.verify_calls += res.verify_calls
                    self.metrics.verified_tokens += sum(res.accept_lengths)
            else:
                ids, reason = new.get(slot, []), None
            job.n_read += len(ids)
            hit = job.stream.add(ids)
            if hit is None and reason is not None:
                hit = job.stream.finish()
            if hit is not None:
                if res is None:
                    self.engine.cancel(slot)  # the stop string ends it here
                reason = "stop"
            piece = job.stream.piece(final=reason is not None)
            if piece:
                job.post("text", piece)
            if reason is not None:
                self._end(job, reason)


# ---- HTTP ----
def _num(body: dict, key: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise bad(key, f"{key}: {v!r} must be a number in {'(' if lo_open else '['}{lo}, {hi}]")
    return v


def _int(body: dict, key: str, lo: int, hi: int = (1 << 63) - 1):
    v = body.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
        raise bad(key, f"{key}: {v!r} must be an integer >= {lo}"
                       + (f" and <= {hi}" if hi < (1 << 63) - 1 else ""))
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in c):
        return "".join(p["text"] for p in c)
    raise bad(f"messages[{i}].content", f"messages[{i}].content: expected a string or a list of "
                                        '{"type": "text", "text": ...} parts')


class Server:
    def __init__(self, engine, model_name: str, max_queue: int, api_key: str | None,
                 shutdown_timeout: float):
        from aiohttp import web

        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.shutdown_timeout = shutdown_timeout
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, max_queue, self.metrics)
        self.created = int(time.time())
        self.sampling = "verify_sampled" in engine.graphs
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat),
                             web.get("/v1/models", self.models), web.get("/health", self.health),
                             web.get("/metrics", self.metrics_page)])

    # middleware: every error is OpenAI's error JSON; auth on /v1
    async def _errors(self, app, handler):
        from aiohttp import web

        async def run(request):
            endpoint = request.path if request.match_info.route.resource is not None else "other"
            try:
                if self.api_key is not None and request.path.startswith("/v1/"):
                    if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                            "KEY'", "authentication_error", code="invalid_api_key")
                resp = await handler(request)
            except APIError as e:
                resp = web.json_response(e.body(), status=e.status)
            except web.HTTPException as e:  # aiohttp's own: 404 unknown path, 405, 413, ...
                if e.status < 400:
                    raise
                kind = "invalid_request_error" if e.status < 500 else "server_error"
                resp = web.json_response(APIError(e.status, e.reason, kind).body(), status=e.status)
            except asyncio.CancelledError:  # the client left (nginx's 499: client closed request)
                with self.metrics.lock:
                    self.metrics.http[(endpoint, 499)] += 1
                raise
            with self.metrics.lock:
                self.metrics.http[(endpoint, resp.status)] += 1
            return resp
        return run

    async def health(self, request):
        from aiohttp import web

        if self.scheduler.draining:
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_page(self, request):
        from aiohttp import web

        waiting, live = self.scheduler.depth()
        return web.Response(text=self.metrics.text(waiting, live, self.engine.max_batch),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "spec-compiler",
             "max_model_len": self.engine.dims.max_seq_len}]})

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def _body(self, request) -> dict:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(None, f"the body is not valid JSON ({brief(e)})") from None
        if not isinstance(body, dict):
            raise bad(None, "the body must be a JSON object")
        return body

    def _parse(self, body: dict, chat: bool) -> tuple[dict, list[int]]:
        """The request's generation settings, checked, and its prompt ids; APIError otherwise."""
        from .chat import encode_messages
        from .runtime.generate import check_sampling

        model = body.get("model")
        if not isinstance(model, str):
            raise bad("model", "model: required, a string (GET /v1/models lists it)")
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        for key, noop in UNSUPPORTED.items():
            if key in body and body[key] not in noop:
                raise bad(key, f"{key}: not supported by this server (only its default, "
                               f"{json.dumps(noop[-1])}, or leave it out)", code="unsupported_parameter")
        if body.get("n") not in (None, 1):
            raise bad("n", f"n: {body['n']!r}: only n = 1 is supported", code="unsupported_parameter")
        tok = self.engine.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise bad("messages", "messages: required, a non-empty list of {\"role\", \"content\"}")
            clean = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise bad(f"messages[{i}]", f"messages[{i}]: expected an object with a role "
                                                f"({', '.join(ROLES)}) and content")
                clean.append({"role": m["role"], "content": _content(m, i)})
            try:
                ids = encode_messages(tok, clean)
            except SpecCompileError as e:
                raise bad("messages", str(e)) from None
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]  # a batch of one prompt
            if isinstance(p, str):
                try:
                    ids = list(tok(p)["input_ids"])
                except Exception as e:
                    raise bad("prompt", f"prompt: the tokenizer failed on it ({brief(e)})") from None
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                V = self.engine.spec.model.vocab_size
                if not all(0 <= t < V for t in p):
                    raise bad("prompt", f"prompt: token ids must be in [0, {V})")
                ids = p
            else:
                raise bad("prompt", "prompt: required, a string or a list of token ids (one "
                                    "prompt: lists of prompts are not supported)")
            if not ids:
                raise bad("prompt", "prompt: empty; give at least one token")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_new = _int(body, key, 1)
        temperature = _num(body, "temperature", 1.0 if self.sampling else 0.0, 0, 2)
        top_p = _num(body, "top_p", 1.0, 0, 1, lo_open=True)
        top_k = _int(body, "top_k", -1) or 0
        top_k = 0 if top_k < 0 else top_k
        seed = _int(body, "seed", -(1 << 63))
        if temperature > 0 and not self.sampling:
            raise bad("temperature", "temperature: this engine decodes greedily only (compiled "
                                     "with --no-sampling); use temperature 0")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP
                                     and all(isinstance(s, str) and s for s in stop)):
            raise bad("stop", f"stop: a non-empty string or a list of at most {MAX_STOP} of them")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise bad("stream", "stream: must be true or false")
        opts = body.get("stream_options")
        if opts is not None:
            if not stream:
                raise bad("stream_options", "stream_options: only allowed with stream: true")
            if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
                raise bad("stream_options", "stream_options: expected {\"include_usage\": true|false}")
        try:
            check_sampling(float(temperature), float(top_p), top_k, seed)
        except SpecCompileError as e:  # (the checks above catch these first)
            raise bad(None, str(e)) from None
        try:
            self.engine.check_request(len(ids), max_new)
        except SpecCompileError as e:
            raise bad(key if self.engine.dims.fits(len(ids), 1) else ("messages" if chat else "prompt"),
                      str(e).replace("--max-new-tokens", key).replace("max-new-tokens", key),
                      code="context_length_exceeded") from None
        return dict(max_new=max_new, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                    seed=seed, stop=stop or [], stream=bool(stream),
                    include_usage=bool(opts and opts.get("include_usage"))), ids

    async def _generate(self, request, chat: bool):
        from aiohttp import web

        body = await self._body(request)
        opts, ids = self._parse(body, chat)
        job = Job(ids, opts["max_new"], opts["temperature"], opts["top_p"], opts["top_k"], opts["seed"],
                  TextStream(self.engine.decode, opts["stop"]), asyncio.get_running_loop())
        self.scheduler.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": self.model_name}

        def usage(n):
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        resp = None
        try:
            if not opts["stream"]:
                parts = []
                while True:
                    ev = await job.events.get()
                    if ev[0] == "text":
                        parts.append(ev[1])
                    elif ev[0] == "error":
                        raise ev[1]
                    else:
                        break
                text = "".join(parts)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "logprobs": None, "finish_reason": ev[1]} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": ev[1]})
                return web.json_response(head | {"choices": [choice], "usage": usage(ev[2])})

            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            extra = {"usage": None} if opts["include_usage"] else {}

            async def send(obj):
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            def chunk(text, reason, first=False):
                if chat:
                    delta = ({"role": "assistant", "content": text} if first else
                             {"content": text} if text else {})
                    return head | {"choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": reason}]} | extra
                return head | {"choices": [{"index": 0, "text": text, "logprobs": None,
                                            "finish_reason": reason}]} | extra

            if chat:
                await send(chunk("", None, first=True))
            while True:
                ev = await job.events.get()
                if ev[0] == "text":
                    await send(chunk(ev[1], None))
                elif ev[0] == "error":
                    await send(ev[1].body())
                    break
                else:
                    await send(chunk("", ev[1]))
                    if opts["include_usage"]:
                        await send(head | {"choices": [], "usage": usage(ev[2])})
                    break
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.scheduler.cancel(job)  # a no-op once it ended; frees the slot if the client left

    # ---- lifecycle ----
    async def serve(self, host: str, port: int) -> None:
        """Serve until SIGTERM/SIGINT, then drain (module docstring)."""
        from aiohttp import web

        runner = web.AppRunner(self.app, handler_cancellation=True,
                               access_log=log if log.isEnabledFor(logging.INFO) else None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise SpecCompileError(f"cannot listen on {host}:{port} ({brief(e)}); pick another "
                                   "--port or stop what uses it") from None
        bound = runner.addresses[0][1] if runner.addresses else port
        self.scheduler.thread.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"spec-serve: serving {self.model_name!r} on http://{host}:{bound} (slots: "
              f"{self.engine.max_batch}); SIGTERM or Ctrl-C stops", file=sys.stderr, flush=True)
        await stop.wait()
        with self.scheduler.cond:
            self.scheduler.draining = True
        n = sum(self.scheduler.depth())
        print(f"spec-serve: stopping: {n} request(s) in flight, up to {self.shutdown_timeout:g} s "
              "to finish", file=sys.stderr, flush=True)
        stop.clear()  # a second signal cancels at once
        deadline = time.monotonic() + self.shutdown_timeout
        while not self.scheduler.idle() and time.monotonic() < deadline and not stop.is_set():
            await asyncio.sleep(0.05)
        self.scheduler.stop()  # what is left is cancelled; its handlers finish their responses
        await asyncio.sleep(0.1)
        await runner.cleanup()
        print("spec-serve: stopped", file=sys.stderr, flush=True)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spec-serve", description=(
        "Serve a compiled engine over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics)."))
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (printed)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the checkpoint's name in the manifest, "
                        "else the engine directory's name)")
    p.add_argument("--max-queue", type=int, default=1024, metavar="N",
                   help="requests waiting for a slot before new ones get 429 (default 1024)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SPEC_API_KEY, else none)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests get to finish before they are "
                        "cancelled (default 30)")
    add_tp_flag(p)
    return add_verbose_flag(p)


def model_name(manifest: dict, engine_dir: Path) -> str:
    """The checkpoint's name as the manifest records it, else (engines built before it was
    recorded) the engine directory's name."""
    v = manifest.get("model_name")
    return v if isinstance(v, str) and v else engine_dir.resolve().name


@cli_entry(interrupted="interrupted")
def main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise SpecCompileError(f"--port {args.port}: must be in [0, 65535]")
    if args.max_queue < 1:
        raise SpecCompileError(f"--max-queue {args.max_queue}: must be >= 1 (requests wait here "
                               "for a free slot)")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise SpecCompileError(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get("SPEC_API_KEY") or None
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SpecCompileError("spec-serve needs aiohttp: pip install aiohttp") from None
    from .cli import tensor_parallel
    from .runtime import Engine
    from .runtime import tp as ranks

    status = tensor_parallel("spec_compiler.serve:main", argv, args)
    if status is not None:
        return status
    engine = Engine.load(args.engine_dir)
    if engine.spec.tp > 1 and ranks.rank() > 0:  # rank 0 serves; this rank makes its engine calls
        ranks.follow(engine)
        return 0
    if engine.tokenizer is None:
        raise SpecCompileError(f"{args.engine_dir}: this engine has no tokenizer (its checkpoint had "
                               "none); spec-serve needs one to read prompts and write text")
    name = args.served_model_name or model_name(engine.spec.manifest, args.engine_dir)
    leader = ranks.Leader(engine) if engine.spec.tp > 1 else None
    server = Server(leader or engine, name, args.max_queue, api_key, args.shutdown_timeout)
    try:
        asyncio.run(server.serve(args.host, args.port))
    finally:
        if leader is not None:
            leader.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
