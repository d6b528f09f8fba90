"""The OpenAI-compatible server: the official openai client against a live uvicorn server,
error codes, the bounded queue, metrics, and a concurrent load test with per-request checks."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import leanlm  # noqa: E402
from leanlm.decode.generate import Sampling, generate_tokens  # noqa: E402
from leanlm.serve.app import Job, ServerLimits, create_app  # noqa: E402

NAME = "tiny-llama"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}w1"


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    model, tok = leanlm.load(tiny_dirs["llama"])
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


def expected(model, tok, ids: list[int], max_tokens: int) -> tuple[str, str]:
    """What the same prompt gives alone: (text, finish_reason)."""
    eos = set(model.config.eos_token_ids) | {tok.eos_token_id}
    new, finish = [], "length"
    for t in generate_tokens(model, ids, max_tokens, Sampling(), eos):
        if t in eos:
            finish = "stop"
            break
        new.append(t)
    return tok.decode(new, skip_special_tokens=True), finish


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    app = create_app(model, tok, NAME, ServerLimits(max_queue=64, max_prompt_tokens=40, max_tokens=64))
    base, srv, th = _live(app)
    yield base, app
    srv.should_exit = True
    th.join(timeout=10)
    app.state.engine.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_metrics(server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == [NAME]
    base = server[0]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    text = httpx.get(base + "/metrics").text
    for key in ("leanlm_tokens_per_second", "leanlm_queue_depth", "leanlm_requests_total", "leanlm_completion_tokens_total"):
        assert key in text


def test_completion_matches_decoder(tiny, client):
    model, tok = tiny
    prompt = "w3 w5 w7 the end"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    text, finish = expected(model, tok, tok(prompt).input_ids, 12)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(tok(prompt).input_ids)
    assert r.object == "text_completion" and r.model == NAME


def test_chat_and_streaming(tiny, client):
    model, tok = tiny
    msgs = [{"role": "user", "content": "w10 w11 w12"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
    text, finish = expected(model, tok, ids, 10)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    stream = client.completions.create(model=NAME, prompt="w1 w2", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected(model, tok, tok("w1 w2").input_ids, 8)[0]


def test_stop_string(tiny, client):
    model, tok = tiny
    full, _ = expected(model, tok, tok("w4 w4").input_ids, 16)
    words = full.split()
    if len(words) < 3:
        pytest.skip("the random model stops too early to test stop strings")
    r = client.completions.create(model=NAME, prompt="w4 w4", max_tokens=16, temperature=0, stop=[" " + words[2]])
    assert r.choices[0].text == full[: full.index(" " + words[2])]
    assert r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=NAME, prompt="w4 w4", max_tokens=16, temperature=0, stop=[" " + words[2]],
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text  # held-back tail never leaks


def test_client_errors(server, client):
    import httpx

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="w1", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="at most 40"):
        client.completions.create(model=NAME, prompt=" ".join(["w1"] * 60), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="w1", max_tokens=1000)
    base = server[0]
    r = httpx.post(base + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    bad = [
        {"model": NAME},  # no prompt
        {"prompt": "w1"},  # no model
        {"model": NAME, "prompt": "w1", "temperature": "hot"},
        {"model": NAME, "prompt": "w1", "max_tokens": 0},
        {"model": NAME, "prompt": "w1", "n": 2},
        {"model": NAME, "prompt": ""},
        [1, 2, 3],
    ]
    for body in bad:
        r = httpx.post(base + "/v1/completions", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400
    assert 'status="404"' in httpx.get(base + "/metrics").text


def test_queue_full_is_503(tiny):
    from fastapi.testclient import TestClient

    model, tok = tiny
    app = create_app(model, tok, NAME, ServerLimits(max_queue=1))
    engine = app.state.engine
    engine.close()  # stop the worker so the queue stays full
    engine.jobs.put_nowait(Job([1, 2], 4, Sampling(), []))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "w1", "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert "leanlm_rejected_queue_full_total 1" in c.get("/metrics").text


def test_concurrent_load(tiny, server):
    """32 requests from 8 client threads: each answer is complete and is its own prompt's answer."""
    model, tok = tiny
    base = server[0]
    reqs = []
    for i in range(32):
        prompt = " ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(2 + i % 5))
        reqs.append((prompt, 4 + i % 9, i % 4 == 0, i % 3 == 0))  # prompt, max_tokens, stream, chat
    want = {}
    for prompt, n, _, chat in reqs:
        msgs = [{"role": "user", "content": prompt}]
        if chat:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
        else:
            ids = tok(prompt).input_ids
        want[(prompt, n, chat)] = expected(model, tok, ids, n)

    local = threading.local()

    def one(req):
        prompt, n, stream, chat = req
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        c = local.client
        if chat:
            msgs = [{"role": "user", "content": prompt}]
            if stream:
                chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=n, temperature=0, stream=True))
                return "".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason
            r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=n, temperature=0)
            return r.choices[0].message.content, r.choices[0].finish_reason
        if stream:
            chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True))
            return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, reqs))
    for (prompt, n, stream, chat), answer in zip(reqs, got):
        assert answer == want[(prompt, n, chat)], (prompt, n, stream, chat)
    assert server[1].state.engine.queue_depth == 0


def test_cli_serve_help():
    from leanlm.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    args = build_parser().parse_args(["serve", "m", "--port", "9000", "--max-queue", "4"])
    assert args.port == 9000 and args.max_queue == 4 and args.host == "127.0.0.1"
    assert json.dumps({"ok": True})


def _live(app):
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    return f"http://127.0.0.1:{port}", srv, th


def _ask_all(base: str, reqs: list[tuple[str, int]], workers: int) -> list[str]:
    import httpx

    def one(req):
        prompt, n = req
        r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": n,
                                                       "temperature": 0}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, reqs))


def test_interleaved_requests_are_exact_and_short_ones_finish_first(tiny):
    """Four requests decoded in turn one step at a time: every answer is its prompt's alone, and a short
    request sent after a long one finishes first."""
    import httpx

    from leanlm.decode.generate import generate_tokens

    model, tok = tiny
    order = []

    def noting(model, ids, max_new, sampling, eos, stats):
        try:
            for t in generate_tokens(model, ids, max_new, sampling, eos, stats):
                time.sleep(0.01)
                yield t
        finally:
            order.append(len(ids))

    app = create_app(model, tok, NAME, ServerLimits(max_tokens=64, max_active=4, quantum=1), decode_fn=noting)
    base, srv, th = _live(app)
    try:
        reqs = [(" ".join(f"w{(i * 11 + j * 7 + 3) % 90}" for j in range(3 + i)), 6 + 5 * i) for i in range(8)]
        assert sum(bool(expected(model, tok, tok(p).input_ids, n)[0]) for p, n in reqs) >= 6  # answers to compare
        got = _ask_all(base, reqs, workers=8)
        for (prompt, n), text in zip(reqs, got):
            assert text == expected(model, tok, tok(prompt).input_ids, n)[0], (prompt, n)
        assert len(expected(model, tok, tok("w1 w2 w3 w4 w5").input_ids, 60)[0].split()) > 20  # it is long
        order.clear()
        long_req = threading.Thread(target=_ask_all, args=(base, [("w1 w2 w3 w4 w5", 60)], 1))
        long_req.start()
        time.sleep(0.15)
        _ask_all(base, [("w9", 3)], 1)
        long_req.join()
        assert order == [1, 5]  # the 1-token prompt's 3 tokens ended before the 5-token prompt's 60
        assert "leanlm_active_requests 0" in httpx.get(base + "/metrics").text
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        app.state.engine.close()


def test_batched_requests_are_exact_decoded_together_and_short_ones_finish_first(tiny, monkeypatch):
    """Continuous batching: 8 concurrent requests are decoded in shared forwards (more rows than steps in
    /metrics), every answer is its prompt's alone, and a short request that joins a long one's batch
    leaves it first."""
    import httpx

    from leanlm.decode import batch

    model, tok = tiny
    step = batch.step

    def slow_step(model, seqs):  # steps slow enough that requests overlap on any machine
        time.sleep(0.01)
        return step(model, seqs)

    monkeypatch.setattr(batch, "step", slow_step)
    app = create_app(model, tok, NAME, ServerLimits(max_tokens=64, max_active=8))
    assert app.state.engine.batched
    base, srv, th = _live(app)
    try:
        reqs = [(" ".join(f"w{(i * 13 + j * 5 + 1) % 90}" for j in range(2 + i)), 8 + 4 * i) for i in range(8)]
        assert sum(bool(expected(model, tok, tok(p).input_ids, n)[0]) for p, n in reqs) >= 6  # answers to compare
        got = _ask_all(base, reqs, workers=8)
        for (prompt, n), text in zip(reqs, got):
            assert text == expected(model, tok, tok(prompt).input_ids, n)[0], (prompt, n)
        metrics = httpx.get(base + "/metrics").text
        value = lambda name: float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith(name + " ")))  # noqa: E731
        assert value("leanlm_batching") == 1
        assert value("leanlm_decode_rows_total") > 1.5 * value("leanlm_decode_steps_total")  # requests shared steps
        done = []

        def ask(prompt, n):
            _ask_all(base, [(prompt, n)], 1)
            done.append(n)

        long_req = threading.Thread(target=ask, args=("w1 w2 w3 w4 w5", 60))
        long_req.start()
        time.sleep(0.15)
        ask("w9", 3)
        long_req.join()
        assert done == [3, 60]
        assert "leanlm_active_requests 0" in httpx.get(base + "/metrics").text
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        app.state.engine.close()


def test_cancelled_request_leaves_the_batch(tiny, monkeypatch):
    """A client that disconnects mid-stream is dropped from the batch at the next step; the others finish exact."""
    import httpx

    from leanlm.decode import batch

    model, tok = tiny
    step = batch.step
    monkeypatch.setattr(batch, "step", lambda model, seqs: (time.sleep(0.02), step(model, seqs)))
    app = create_app(model, tok, NAME, ServerLimits(max_tokens=64, max_active=8))
    base, srv, th = _live(app)
    try:
        others = threading.Thread(target=lambda: got.extend(_ask_all(base, reqs, 2)))
        reqs = [("w3 w4", 30), ("w7 w8 w9", 25)]
        got: list[str] = []
        others.start()
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", base + "/v1/completions", json={"model": NAME, "prompt": "w1 w2 w3", "max_tokens": 60,
                                                                  "temperature": 0, "stream": True}) as r:  # fmt: skip
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first chunk
        others.join()
        for (prompt, n), text in zip(reqs, got):
            assert text == expected(model, tok, tok(prompt).input_ids, n)[0]
        deadline = time.time() + 10
        while "leanlm_cancelled_total 1" not in httpx.get(base + "/metrics").text and time.time() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(base + "/metrics").text
        assert "leanlm_cancelled_total 1" in metrics and "leanlm_active_requests 0" in metrics
        completion = float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("leanlm_completion_tokens_total")))
        assert completion < 30 + 25 + 60  # the abandoned request did not run to its 60 tokens
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        app.state.engine.close()


@pytest.mark.parametrize("option", ["kv-int8", "kv-window", "speculative-lookup"])
def test_decode_options_from_the_server(tiny, option):
    """KV policies and speculative decoding set from the server's options answer what the same option
    gives alone (speculative decoding: exactly plain greedy decoding)."""
    import functools

    from leanlm.attention import KVPolicy
    from leanlm.decode.speculative import make_draft, speculative_generate_tokens

    model, tok = tiny
    kv, decode_fn, max_active = None, None, 4
    if option == "kv-int8":
        kv = KVPolicy.parse("int8")
    elif option == "kv-window":
        kv = KVPolicy.parse("sinks:2,window:6")
    else:
        decode_fn = functools.partial(speculative_generate_tokens, draft=make_draft("lookup", model), gamma=3)
        max_active = 1
    app = create_app(model, tok, NAME, ServerLimits(max_tokens=64, max_active=max_active, quantum=2),
                     decode_fn=decode_fn, kv=kv)  # fmt: skip
    assert not app.state.engine.batched  # these decode one request per forward (interleaved)
    base, srv, th = _live(app)
    try:
        reqs = [(" ".join(f"w{(i * 5 + j * 2) % 90}" for j in range(4 + i % 3)), 12 + i) for i in range(6)]
        got = _ask_all(base, reqs, workers=6)
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        app.state.engine.close()
    eos = set(model.config.eos_token_ids) | {tok.eos_token_id}
    for (prompt, n), text in zip(reqs, got):
        new = []
        for t in generate_tokens(model, tok(prompt).input_ids, n, Sampling(), eos, kv=kv):
            if t in eos:
                break
            new.append(t)
        assert text == tok.decode(new, skip_special_tokens=True), (option, prompt)
