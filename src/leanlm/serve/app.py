"""OpenAI-compatible HTTP server on leanlm's decoder (FastAPI + uvicorn).

One model, one worker thread: requests wait in a bounded queue and are generated one at a
time (the runtime holds one KV cache), so each response is exactly what the same prompt
gives alone. A full queue answers 503; malformed requests, oversize prompts, too many
max_tokens and unknown models answer 4xx with an OpenAI-style error body.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus text format).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..decode.generate import Sampling, generate_tokens
from ..errors import LeanlmError

try:  # optional dependency: pip install 'leanlm[serve]'
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as e:  # pragma: no cover
    raise LeanlmError("the server needs FastAPI and uvicorn: pip install 'leanlm[serve]'") from e


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerLimits:
    max_queue: int = 16  # requests waiting (not counting the one being generated)
    max_prompt_tokens: int | None = None  # default: the model's context - 1
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 128


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (endpoint, status) -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.generate_s = 0.0
        self.last_tok_s = 0.0
        self.rejected_full = 0

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1


class Engine:
    """The worker: takes jobs from the bounded queue and generates them one at a time."""

    def __init__(self, model, tokenizer, limits: ServerLimits):
        self.model, self.tok, self.limits = model, tokenizer, limits
        self.jobs: "queue.Queue[Job | None]" = queue.Queue(maxsize=limits.max_queue)
        self.busy = False
        self.metrics = Metrics()
        self.eos = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self.thread = threading.Thread(target=self._loop, name="leanlm-worker", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize() + int(self.busy)

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
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            self.busy = True
            try:
                self._run(job)
            except Exception as e:  # report to the waiting request, keep serving
                job.events.put(("error", f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        new: list[int] = []
        sent = 0
        finish = "length"
        text = ""
        for tok in generate_tokens(self.model, job.prompt_ids, job.max_tokens, job.sampling, self.eos):
            if job.cancelled:
                finish = "cancelled"
                break
            if tok in self.eos:
                finish = "stop"
                break
            new.append(tok)
            text = self.tok.decode(new, skip_special_tokens=True)
            hits = [text.index(s) for s in job.stop if s in text]
            if hits:
                text = text[: min(hits)]
                finish = "stop"
            # hold back a partial multi-byte character, and any tail that may start a stop string
            safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
            if not hits:
                base = safe
                for s in job.stop:
                    for k in range(min(len(s) - 1, base), 0, -1):
                        if text[:base].endswith(s[:k]):
                            safe = min(safe, base - k)
                            break
            if safe > sent:
                job.events.put(("text", text[sent:safe]))
                sent = safe
            if hits:
                break
        if len(text) > sent and finish != "cancelled":
            job.events.put(("text", text[sent:]))
        dt = time.perf_counter() - t0
        m = self.metrics
        with m.lock:
            m.prompt_tokens += len(job.prompt_ids)
            m.completion_tokens += len(new)
            m.generate_s += dt
            m.last_tok_s = len(new) / dt if dt > 0 else 0.0
        job.events.put(("done", finish, {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(new),
                                         "total_tokens": len(job.prompt_ids) + len(new)}))  # fmt: skip


# ---- request parsing ----------------------------------------------------------------------
def _num(body: dict, key: str, kind, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise APIError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", param=key)
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


def create_app(model, tokenizer, model_name: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `model` under the id `model_name`; app.state.engine is the worker."""
    limits = limits or ServerLimits()
    ctx = model.config.max_seq_len
    max_prompt = min(limits.max_prompt_tokens or ctx - 1, ctx - 1)
    engine = Engine(model, tokenizer, limits)
    created = int(time.time())
    app = FastAPI(title="leanlm", description="OpenAI-compatible completions on leanlm's decoder")
    app.state.engine = engine
    app.state.limits = limits

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        engine.metrics.count(request.url.path, exc.status)
        return exc.response()

    async def _body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
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
        seed = _num(body, "seed", int, None)
        if top_p == 0.0:
            temperature = 0.0  # nothing but the top token survives: greedy
        sampling = Sampling(temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed)
        return engine.submit(Job(prompt_ids, min(max_tokens, ctx - len(prompt_ids)), sampling, _stop(body)))

    def _wait(job: Job) -> tuple[str, str, dict]:
        parts = []
        while True:
            ev = job.events.get()
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "done":
                return "".join(parts), ev[1], ev[2]
            else:
                raise APIError(500, f"generation failed: {ev[1]}", "server_error")

    def _sse(job: Job, chunk_fn, endpoint: str):
        def gen():
            try:
                first = chunk_fn(None, None, start=True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    ev = job.events.get()
                    if ev[0] == "text":
                        yield f"data: {json.dumps(chunk_fn(ev[1], None))}\n\n"
                    elif ev[0] == "done":
                        yield f"data: {json.dumps(chunk_fn('', ev[1]))}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # client gone or finished: stop generating

        engine.metrics.count(endpoint, 200)
        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _finish(job: Job):
        import anyio

        try:
            return await anyio.to_thread.run_sync(_wait, job)
        except BaseException:
            job.cancelled = True
            raise

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
            ids = tokenizer(prompt).input_ids
        else:
            raise APIError(400, "'prompt' must be a string (or one string / a list of token ids)", param="prompt")
        job = _job(body, ids)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, start=False):
            if start:
                return None
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        if body.get("stream"):
            return _sse(job, chunk, "/v1/completions")
        text, finish, usage = await _finish(job)
        engine.metrics.count("/v1/completions", 200)
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
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        job = _job(body, list(ids))
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, start=False):
            delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

        if body.get("stream"):
            return _sse(job, chunk, "/v1/chat/completions")
        text, finish, usage = await _finish(job)
        engine.metrics.count("/v1/chat/completions", 200)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}], "usage": usage}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "leanlm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.thread.is_alive() else "worker stopped", "model": model_name,
                "queue_depth": engine.queue_depth}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics
        with m.lock:
            lines = [
                "# HELP leanlm_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE leanlm_requests_total counter",
                *(f'leanlm_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(m.requests.items())),
                "# TYPE leanlm_rejected_queue_full_total counter",
                f"leanlm_rejected_queue_full_total {m.rejected_full}",
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
                "# TYPE leanlm_queue_capacity gauge",
                f"leanlm_queue_capacity {limits.max_queue}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def serve(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          limits: ServerLimits | None = None) -> None:  # fmt: skip
    import uvicorn

    app = create_app(model, tokenizer, model_name, limits)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.engine.close()
