"""OpenAI-compatible HTTP server on leanlm's decoder (FastAPI + uvicorn).

One model, one worker thread: requests wait in a bounded queue (full: 503); up to max_active of them
are decoded together by continuous batching (one forward per step for all of them, each with its own
KV cache and position; requests join and leave between steps), so the weights are read once per step
for up to 16 requests, and each response is exactly what the same prompt gives alone. Speculative
decoding, KV-cache policies and models whose blocks do not run as one fused call are decoded in turn
instead (interleaved, a few steps each; see Engine).

What keeps one request from hurting the others:
- the body is read with a size limit (413) and parsed strictly (400: invalid JSON, NaN/Infinity,
  lone surrogates, out-of-range numbers), before anything else runs;
- tokenization and chat templating run in a thread off the event loop, on their own tokenizer copy,
  so /health and the other endpoints answer while a large prompt is encoded;
- the worker checks after every decode step whether the request is still wanted: a client that
  disconnects (streaming or not) cancels its generation within one step;
- chat message content is encoded as text: control-token strings typed into it (e.g. '<|im_start|>')
  never become control tokens, so a user cannot forge a system turn;
- every error has the OpenAI shape {"error": {"message", "type", "param", "code"}} and is counted in
  /metrics; an optional API key (Authorization: Bearer KEY) guards /v1/* and /metrics.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..decode.generate import GenerationStats, Sampling, generate_tokens
from ..errors import LeanlmError

try:  # optional dependency: pip install 'leanlm[serve]'
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover
    raise LeanlmError("the server needs FastAPI and uvicorn: pip install 'leanlm[serve]'") from e

log = logging.getLogger("leanlm.serve")

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # the OpenAI API's seed is an int64
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read (and dropped) so the client gets its 413


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class ServerLimits:
    max_queue: int = 16  # requests waiting (not counting the one being generated)
    max_prompt_tokens: int | None = None  # default: the model's context - 1
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 128
    max_body_bytes: int = 1 << 20  # request bodies above this answer 413
    max_active: int = 16  # requests decoded at once (batched, or in turn; each with its own KV cache); 1: one at a time
    quantum: int = 8  # when interleaving: decode steps a request runs before the next active one has its turn

    def __post_init__(self):
        for name in ("max_queue", "max_tokens", "default_max_tokens", "max_body_bytes", "max_active", "quantum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LeanlmError(f"server limit {name} must be a positive integer, got {v!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1):
            raise LeanlmError(f"server limit max_prompt_tokens must be a positive integer, got {self.max_prompt_tokens!r}")
        if self.default_max_tokens > self.max_tokens:
            self.default_max_tokens = self.max_tokens


@dataclass
class Job:
    """One request's generation. The worker thread calls put(); the request's handler reads the events
    on its event loop (bind()), or from `events` when no loop is bound (tests, direct use)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> "Job":
        self._loop, self._aqueue = loop, asyncio.Queue()
        return self

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, event: tuple) -> None:
        if self._loop is None:
            self.events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            self.cancelled = True

    async def next_event(self) -> tuple:
        return await self._aqueue.get()


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (endpoint, status) -> count
        self.errors = {}  # (status, type, code) -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.generate_s = 0.0
        self.last_tok_s = 0.0
        self.rejected_full = 0
        self.cancelled = 0
        self.decode_steps = self.decode_rows = 0  # batched forwards, and the requests they decoded

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def count_error(self, status: int, type_: str, code: str | None) -> None:
        with self.lock:
            key = (status, type_, code or "")
            self.errors[key] = self.errors.get(key, 0) + 1


DecodeFn = Callable  # (model, prompt_ids, max_new_tokens, sampling, eos_ids, stats) -> Iterator[int]


class Engine:
    """The worker thread: takes jobs from the bounded queue and decodes up to `limits.max_active` of them at once.

    Continuous batching (`batched`, the default where the model allows it): each active request has its own
    KV caches and position (decode/batch.py); every step is one forward for all of them (the linears read
    each weight once per 16 requests, attention runs per request over its own cache). A new request is
    prefilled alone between two steps and joins the batch; a finished or cancelled one leaves it. Every
    request's tokens are exactly those it gets alone (the kernels are batch-invariant).

    Interleaving otherwise (a `decode_fn` such as speculative decoding, a KV-cache policy, a model whose blocks
    do not run as one fused call): each request's own generator runs `limits.quantum` steps in turn, its KV
    caches installed on the model's layers for its turn, so it is still exact and a short request is not
    stuck behind a long one, but each forward decodes one request. A `decode_fn` whose state lives outside
    the layer caches (a speculative draft) needs max_active=1. max_active=1 decodes one request at a time.

    `decode_fn` replaces generate_tokens (e.g. exact speculative decoding, decode/speculative.py).
    `kv` is the KV-cache policy plain decoding uses (leanlm.attention.KVPolicy; None: the model's own)."""

    def __init__(self, model, tokenizer, limits: ServerLimits, decode_fn: DecodeFn | None = None, kv=None):
        from ..decode.batch import batchable

        self.model, self.tok, self.limits = model, tokenizer, limits
        self.decode_fn, self.kv = decode_fn, kv
        self.batched = decode_fn is None and kv is None and batchable(model)
        self.jobs: "queue.Queue[Job | None]" = queue.Queue(maxsize=limits.max_queue)
        self.active: list[_Run] = []
        self.metrics = Metrics()
        self.eos = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self._installed: _Run | None = None  # whose caches the model's layers hold now (interleaving)
        self.thread = threading.Thread(target=self._loop, name="leanlm-worker", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize() + len(self.active)

    def submit(self, job: Job) -> Job:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            with self.metrics.lock:
                self.metrics.rejected_full += 1
            raise APIError(503, f"server busy: {self.limits.max_queue} requests already queued; retry later",
                           "server_error", "queue_full") from None  # fmt: skip
        return job

    def close(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout=10)

    # ---- the worker -------------------------------------------------------------------------------
    def _admit(self) -> bool:
        """Move queued jobs into the active set (waiting for one when nothing is active); False on close."""
        while len(self.active) < self.limits.max_active:
            try:
                job = self.jobs.get(block=not self.active)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled:  # its client left while it waited
                with self.metrics.lock:
                    self.metrics.cancelled += 1
                job.put(("done", "cancelled", _usage(job, 0)))
                continue
            self.active.append(_Run(self, job))
        return True

    def _install(self, run: "_Run") -> None:
        """Put `run`'s KV caches on the model's layers (saving those of the run that held them)."""
        if self._installed is run:
            return
        layers = self.model.layers
        if self._installed is not None:
            self._installed.caches = [layer.attn.cache for layer in layers]
        for layer, cache in zip(layers, run.caches or [None] * len(layers)):
            layer.attn.cache = cache
        self._installed = run

    def _loop(self) -> None:
        if self.batched:
            return self._loop_batched()
        while True:
            if not self._admit():
                for run in list(self.active):
                    self._install(run)
                    run.close()
                return
            for run in list(self.active):
                self._install(run)
                for _ in range(self.limits.quantum if len(self.active) > 1 else 1):
                    if not run.step():  # (it left self.active)
                        self._installed = None  # its generator cleared the caches on the way out
                        break

    def _loop_batched(self) -> None:
        from ..decode.batch import step
        from ..decode.threads import ThreadGovernor

        governor = ThreadGovernor()
        try:
            while True:
                if not self._admit():
                    for run in self.active:
                        run.close()
                    return
                # a run that ends leaves self.active (_Run._retire) before its client hears so
                for run in [r for r in self.active if r.seq is None]:  # newcomers: prefill alone, first token
                    run.start()
                for run in [r for r in self.active if r.job.cancelled]:  # clients that left: out before the step
                    run.end_cancelled()
                live = list(self.active)
                if not live:
                    continue
                try:
                    with governor.step():
                        step(self.model, [r.seq for r in live])
                except Exception as e:  # a failed step cannot be pinned on one request: all in it get the error
                    log.exception("batched decode step failed")
                    for run in live:
                        run.fail(e)
                    continue
                with self.metrics.lock:
                    self.metrics.decode_steps += 1
                    self.metrics.decode_rows += len(live)
                for run in live:
                    run.take(run.seq.token)
        finally:
            governor.restore()

    def _tokens(self, job: Job, stats: GenerationStats):
        if self.decode_fn is not None:
            return self.decode_fn(self.model, job.prompt_ids, job.max_tokens, job.sampling, self.eos, stats)
        return generate_tokens(self.model, job.prompt_ids, job.max_tokens, job.sampling, self.eos, stats, kv=self.kv)


class _Run:
    """One active job and its text so far; when batched its Sequence (caches, position, next token), when
    interleaved its token generator and its KV caches while another job has the model."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.tokens = None if engine.batched else engine._tokens(job, GenerationStats())
        self.seq = None
        self.caches: list | None = None
        self.t0 = time.perf_counter()
        self.new: list[int] = []
        self.sent = 0
        self.text = ""

    def close(self) -> None:
        if self.seq is not None:
            self.seq.release()
        close = getattr(self.tokens, "close", None)
        if close is not None:
            close()  # frees the KV cache now, not when the generator is collected

    def _retire(self) -> None:
        """Leave the engine's active set (before the client is told, so /health never counts a finished job)."""
        if self in self.engine.active:
            self.engine.active.remove(self)

    def fail(self, e: Exception) -> bool:
        self.close()
        self._retire()
        self.job.put(("error", f"{type(e).__name__}: {e}"))
        return False

    def end_cancelled(self) -> bool:
        return self._end("cancelled")

    def start(self) -> bool:
        """Batched: the prefill and the first token; False once the job has ended."""
        from ..decode.batch import Sequence

        if self.job.cancelled:
            return self._end("cancelled")
        job = self.job
        try:
            self.seq = Sequence(self.engine.model, job.prompt_ids, job.max_tokens, job.sampling, self.engine.eos)
        except Exception as e:  # report to the waiting request, keep serving the others
            log.exception("prefill failed")
            return self.fail(e)
        return self.take(self.seq.token)

    def take(self, tok: int) -> bool:
        """Batched: the sequence's newest token; False once the job has ended."""
        try:
            if self.job.cancelled:
                return self._end("cancelled")
            if tok in self.engine.eos:
                return self._end("stop")
            if not self._text(tok):
                return False
            return self._end("length") if self.seq.finished else True
        except Exception as e:
            log.exception("generation failed")
            return self.fail(e)

    def step(self) -> bool:
        """Interleaved: one decode step (with the cancel check after it); False once the job has ended."""
        job = self.job
        try:
            if job.cancelled:  # left while waiting for its turn
                return self._end("cancelled")
            try:
                tok = next(self.tokens)
            except StopIteration:
                return self._end("length")
            if job.cancelled:
                return self._end("cancelled")
            if tok in self.engine.eos:
                return self._end("stop")
            return self._text(tok)
        except Exception as e:  # report to the waiting request, keep serving the others
            log.exception("generation failed")
            return self.fail(e)

    def _text(self, tok: int) -> bool:
        job = self.job
        self.new.append(tok)
        text = self.engine.tok.decode(self.new, skip_special_tokens=True)
        hits = [text.index(s) for s in job.stop if s in text]
        if hits:
            text = text[: min(hits)]
        self.text = text
        # hold back a partial multi-byte character, and any tail that may start a stop string
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        if not hits:
            base = safe
            for s in job.stop:
                for k in range(min(len(s) - 1, base), 0, -1):
                    if text[:base].endswith(s[:k]):
                        safe = min(safe, base - k)
                        break
        if safe > self.sent:
            job.put(("text", text[self.sent : safe]))
            self.sent = safe
        return self._end("stop") if hits else True

    def _end(self, finish: str) -> bool:
        self.close()
        job = self.job
        if len(self.text) > self.sent and finish != "cancelled":
            job.put(("text", self.text[self.sent :]))
        dt = time.perf_counter() - self.t0
        m = self.engine.metrics
        with m.lock:
            m.prompt_tokens += len(job.prompt_ids)
            m.completion_tokens += len(self.new)
            m.generate_s += dt
            m.last_tok_s = len(self.new) / dt if dt > 0 else 0.0
            m.cancelled += finish == "cancelled"
        self._retire()
        job.put(("done", finish, _usage(job, len(self.new))))
        return False


def _usage(job: Job, n_new: int) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_new, "total_tokens": len(job.prompt_ids) + n_new}


# ---- request parsing ----------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a dict, or a 400 APIError naming what is wrong (invalid UTF-8 or JSON, NaN or
    Infinity, nesting too deep, an integer too long, a lone surrogate in a string)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is a 5000-digit integer
        raise APIError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_strings(body)
    return body


def _check_strings(obj) -> None:
    """Reject lone surrogates ('\\ud800'): JSON allows the escape, but it is no Unicode text and would fail
    later in the tokenizer."""
    stack = [(obj, None)]
    while stack:
        v, key = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "a string in the request holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                    "escape), which is not valid Unicode text", param=key) from None  # fmt: skip
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, key))
                stack.append((x, key or k))
        elif isinstance(v, list):
            stack.extend((x, key) for x in v)


def _num(body: dict, key: str, kind, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise APIError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", param=key)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{key}' must be a finite number, got {v}", param=key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {v}", param=key)
    return kind(v)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", param="stop")
    return stop


def _flag(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"'{key}' must be true or false", param=key)
    return v


# ---- tokenization: off the event loop, content as text ----------------------------------------
class PromptEncoder:
    """Encodes prompts on a private tokenizer copy (the worker decodes on the original), one at a time."""

    def __init__(self, tokenizer):
        try:
            self.tok = copy.deepcopy(tokenizer)
        except Exception:  # a tokenizer that cannot be copied: share it (encode and decode do not conflict)
            self.tok = tokenizer
        self.lock = threading.Lock()
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        self.special_ids = {i for i, t in added.items() if getattr(t, "special", False)}
        specials = [t.content for t in added.values() if getattr(t, "special", False) and t.content]
        self.special_prefixes = {s[:k] for s in specials for k in range(1, len(s))}
        self.special_suffixes = {s[k:] for s in specials for k in range(1, len(s))}
        self.longest_special = max((len(s) for s in specials), default=0)

    def text(self, prompt: str) -> list[int]:
        """A /v1/completions prompt: the caller writes the raw prompt format, control tokens included."""
        with self.lock:
            return list(self.tok(prompt).input_ids)

    def _has_special_text(self, content: str) -> bool:
        """Whether `content`, placed anywhere in a template, could be read as (part of) a special token."""
        if self.longest_special == 0:
            return False
        if self.special_ids.intersection(self.tok(content, add_special_tokens=False).input_ids):
            return True
        n = min(self.longest_special - 1, len(content))
        return any(content[-k:] in self.special_prefixes or content[:k] in self.special_suffixes for k in range(1, n + 1))

    def chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the chat template, with every message's content encoded as text.

        Content without control-token text is encoded exactly as apply_chat_template does. Content with it
        is cut out of the rendered template and encoded with special tokens off, so '<|im_start|>system'
        typed by a user stays the characters '<', '|', 'im', ... and never opens a turn."""
        with self.lock:
            if not any(self._has_special_text(m["content"]) for m in messages):
                ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
                return list(ids)
            return self._chat_content_as_text(messages)

    def _chat_content_as_text(self, messages: list[dict]) -> list[int]:
        marks = [f"\ue000leanlm-content-{uuid.uuid4().hex}\ue001" for _ in messages]
        render = lambda ms: self.tok.apply_chat_template(ms, add_generation_prompt=True, tokenize=False)  # noqa: E731
        real = render(messages)
        marked = render([{**m, "content": mark} for m, mark in zip(messages, marks)])
        # the template's own text between the contents, in order; a message it does not print leaves no mark
        pieces, contents, rest = [], [], marked
        for m, mark in zip(messages, marks):
            if rest.count(mark) > 1:
                break
            if mark in rest:
                before, rest = rest.split(mark, 1)
                pieces.append(before)
                contents.append(m["content"])
        pieces.append(rest)
        for transform in (lambda c: c, str.strip):  # templates print content as given, or trimmed (Gemma)
            shown = [transform(c) for c in contents]
            if "".join(p + c for p, c in zip(pieces, shown + [""])) == real:
                ids = []
                for piece, content in zip(pieces, shown + [None]):
                    ids += self.tok(piece, add_special_tokens=False).input_ids
                    if content is not None:
                        ids += self.tok(content, add_special_tokens=False, split_special_tokens=True).input_ids
                return list(ids)
        raise APIError(400, "a message holds this model's control-token text (e.g. a '<|...|>' marker), and its chat "
                            "template rewrites message content in a way the server cannot separate from the "
                            "template; remove the control-token text", param="messages")  # fmt: skip


# ---- the app ------------------------------------------------------------------------------------
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _CountResponses:
    """ASGI middleware: counts every response by endpoint and status (unknown paths as 'other', so a client
    cannot grow the label set); a request whose client left before any response counts as 499."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            status = status or 500
            raise
        finally:
            self.metrics.count(endpoint, status if status is not None else 499)


class ClientGone(Exception):
    """The client disconnected: there is nobody to answer."""


def create_app(model, tokenizer, model_name: str, limits: ServerLimits | None = None, api_key: str | None = None,
               decode_fn: DecodeFn | None = None, kv=None) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `model` under the id `model_name`; app.state.engine is the worker.

    `api_key`: when set, /v1/* and /metrics need `Authorization: Bearer <api_key>` (else 401); /health stays
    open for load balancers. `decode_fn` / `kv`: see Engine."""
    limits = limits or ServerLimits()
    if api_key is not None and not api_key:
        raise LeanlmError("the API key is empty; pass a non-empty key or none")
    ctx = model.config.max_seq_len
    max_prompt = min(limits.max_prompt_tokens or ctx - 1, ctx - 1)
    engine = Engine(model, tokenizer, limits, decode_fn, kv)
    encoder = PromptEncoder(tokenizer)
    created = int(time.time())
    app = FastAPI(title="leanlm", description="OpenAI-compatible completions on leanlm's decoder")
    app.state.engine = engine
    app.state.limits = limits
    app.add_middleware(_CountResponses, metrics=engine.metrics)

    def error_response(exc: APIError) -> JSONResponse:
        engine.metrics.count_error(exc.status, exc.type, exc.code)
        return exc.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return error_response(APIError(499, "the client closed the connection; generation cancelled",
                                       code="client_closed_request"))  # fmt: skip

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: the client gets the OpenAI shape, the log the trace
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(APIError(500, f"internal server error ({type(exc).__name__})", "server_error"))

    def _authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with (--api-key or LEANLM_API_KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def _read_body(request: Request) -> bytes:
        limit = limits.max_body_bytes
        too_large = APIError(413, f"request body is larger than this server's limit of {limit} bytes "
                                  "(leanlm serve --max-body-bytes); send a shorter prompt", code="request_too_large")  # fmt: skip
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise APIError(400, f"invalid Content-Length header: {declared!r}")
            if int(declared) > limit:
                if int(declared) <= DRAIN_LIMIT:  # read it to the end (and drop it): the client then sees the 413
                    async for _ in request.stream():
                        pass
                raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(request: Request) -> dict:
        _authorize(request)
        body = parse_json_body(await _read_body(request))
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, "'model' is required (a string); see GET /v1/models", param="model")
        if name != model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{model_name}'",
                           code="model_not_found", param="model")  # fmt: skip
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        return body

    def _job(body: dict, prompt_ids: list[int]) -> Job:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > max_prompt:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; this server accepts at most {max_prompt}",
                           code="context_length_exceeded", param="prompt")  # fmt: skip
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _num(body, key, int, limits.default_max_tokens, 1, limits.max_tokens)
        temperature = _num(body, "temperature", float, 1.0, 0.0, 2.0)
        top_p = _num(body, "top_p", float, 1.0, 0.0, 1.0)
        seed = _num(body, "seed", int, None, SEED_MIN, SEED_MAX)
        stop = _stop(body)
        if top_p == 0.0:
            temperature = 0.0  # nothing but the top token survives: greedy
        sampling = Sampling(temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed)
        job = Job(prompt_ids, min(max_tokens, ctx - len(prompt_ids)), sampling, stop)
        return engine.submit(job.bind(asyncio.get_running_loop()))

    async def _watch_disconnect(request: Request, job: Job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def _collect(request: Request, job: Job) -> tuple[str, str, dict]:
        """Wait for a non-streamed answer; a client that disconnects meanwhile cancels the job."""
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        parts = []
        try:
            while True:
                ev = await job.next_event()
                if ev[0] == "text":
                    parts.append(ev[1])
                elif ev[0] == "done":
                    if ev[1] == "cancelled":
                        raise ClientGone()
                    return "".join(parts), ev[1], ev[2]
                else:
                    raise APIError(500, f"generation failed: {ev[1]}", "server_error")
        finally:
            job.cancel()  # a no-op when it finished; stops it when this handler is cancelled
            watcher.cancel()

    def _sse(job: Job, chunk_fn):
        async def events():
            try:
                first = chunk_fn(None, None, start=True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    ev = await job.next_event()
                    if ev[0] == "text":
                        yield f"data: {json.dumps(chunk_fn(ev[1], None))}\n\n"
                    elif ev[0] == "done":
                        if ev[1] != "cancelled":
                            yield f"data: {json.dumps(chunk_fn('', ev[1]))}\n\n"
                        break
                    else:
                        err = APIError(500, f"generation failed: {ev[1]}", "server_error")
                        engine.metrics.count_error(err.status, err.type, err.code)
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # finished, or the client left (Starlette cancels the stream on disconnect)
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _in_thread(fn, *args):
        return anyio.to_thread.run_sync(fn, *args)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if any(t < 0 or t >= model.config.vocab_size for t in ids):
                raise APIError(400, "prompt token ids out of the vocabulary", param="prompt")
        elif isinstance(prompt, str):
            ids = await _in_thread(encoder.text, prompt)
        else:
            raise APIError(400, "'prompt' must be a string (or one string / a list of token ids)", param="prompt")
        stream = _flag(body, "stream")
        job = _job(body, ids)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, start=False):
            if start:
                return None
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        if stream:
            return _sse(job, chunk)
        text, finish, usage = await _collect(request, job)
        out = chunk(text, finish)
        out["usage"] = usage
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        messages = body.get("messages")
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "developer")
            and isinstance(m.get("content"), (str, list)) for m in messages)  # fmt: skip
        if not ok:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        msgs = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            msgs.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"model '{model_name}' has no chat template; use /v1/completions")
        stream = _flag(body, "stream")
        try:
            ids = await _in_thread(encoder.chat, msgs)
        except APIError:
            raise
        except Exception as e:  # a template that raises on these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected these messages: {type(e).__name__}: {e}",
                           param="messages") from None  # fmt: skip
        job = _job(body, ids)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, start=False):
            delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        if stream:
            return _sse(job, chunk)
        text, finish, usage = await _collect(request, job)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}], "usage": usage}  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "leanlm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.thread.is_alive() else "worker stopped", "model": model_name,
                "queue_depth": engine.queue_depth}  # fmt: skip

    @app.get("/metrics")
    async def metrics(request: Request):
        _authorize(request)
        m = engine.metrics
        with m.lock:
            lines = [
                "# HELP leanlm_requests_total Requests answered, by endpoint and HTTP status (499: client left first).",
                "# TYPE leanlm_requests_total counter",
                *(f'leanlm_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(m.requests.items())),
                "# HELP leanlm_errors_total Error responses, by HTTP status, OpenAI error type and code.",
                "# TYPE leanlm_errors_total counter",
                *(f'leanlm_errors_total{{status="{s}",type="{t}",code="{c}"}} {n}'
                  for (s, t, c), n in sorted(m.errors.items())),  # fmt: skip
                "# TYPE leanlm_rejected_queue_full_total counter",
                f"leanlm_rejected_queue_full_total {m.rejected_full}",
                "# HELP leanlm_cancelled_total Generations stopped because their client disconnected.",
                "# TYPE leanlm_cancelled_total counter",
                f"leanlm_cancelled_total {m.cancelled}",
                "# TYPE leanlm_prompt_tokens_total counter",
                f"leanlm_prompt_tokens_total {m.prompt_tokens}",
                "# TYPE leanlm_completion_tokens_total counter",
                f"leanlm_completion_tokens_total {m.completion_tokens}",
                "# HELP leanlm_tokens_per_second Completion tokens per second of generation time (all requests).",
                "# TYPE leanlm_tokens_per_second gauge",
                f"leanlm_tokens_per_second {m.completion_tokens / m.generate_s if m.generate_s else 0.0:.3f}",
                "# TYPE leanlm_last_request_tokens_per_second gauge",
                f"leanlm_last_request_tokens_per_second {m.last_tok_s:.3f}",
                "# HELP leanlm_queue_depth Requests waiting or being generated.",
                "# TYPE leanlm_queue_depth gauge",
                f"leanlm_queue_depth {engine.queue_depth}",
                "# HELP leanlm_active_requests Requests being decoded (together when batched, else in turn).",
                "# TYPE leanlm_active_requests gauge",
                f"leanlm_active_requests {len(engine.active)}",
                "# HELP leanlm_decode_steps_total Batched decode forwards (continuous batching).",
                "# TYPE leanlm_decode_steps_total counter",
                f"leanlm_decode_steps_total {m.decode_steps}",
                "# HELP leanlm_decode_rows_total Requests decoded by those forwards (rows / steps: the mean batch).",
                "# TYPE leanlm_decode_rows_total counter",
                f"leanlm_decode_rows_total {m.decode_rows}",
                "# HELP leanlm_batching 1 when concurrent requests are decoded together, 0 when in turn.",
                "# TYPE leanlm_batching gauge",
                f"leanlm_batching {int(engine.batched)}",
                "# TYPE leanlm_queue_capacity gauge",
                f"leanlm_queue_capacity {limits.max_queue}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def serve(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          limits: ServerLimits | None = None, api_key: str | None = None, decode_fn: DecodeFn | None = None,
          kv=None) -> None:  # fmt: skip
    import uvicorn

    app = create_app(model, tokenizer, model_name, limits, api_key=api_key, decode_fn=decode_fn, kv=kv)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.engine.close()
