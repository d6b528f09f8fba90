"""Chaos test of `leanlm serve`: N clients for T seconds send a mix of normal, streaming, abandoned,
oversized and malformed requests while a prober times /health.

The server runs as its own process (`python -m leanlm serve MODEL`, the command users run), so the
clients' Python does not share its interpreter. Before the chaos, every prompt of the pool is asked once,
alone and greedily (temperature 0), for its reference answer; during the chaos every normal and streaming
answer must equal its own prompt's reference. An answer that differs is *mixed* when it equals another
prompt's reference (content of another request) and *wrong* otherwise; a request that gets no complete
answer (connection error, timeout, 5xx other than 503, a stream without its end) is *lost*. 503 (queue
full) is an explicit rejection, counted apart. Oversized (2 MB) and malformed requests must get a 4xx in
the OpenAI error shape. A sender repeats a 10 MB request every few seconds; /health latency is reported
over all probes and over the probes taken while a 10 MB request or an abandoned request was in flight.
The server's stderr is scanned for tracebacks.

    PYTHONPATH=src python benchmarks/bench_server_chaos.py                       # smollm2-135m, 8 clients, 60 s
    PYTHONPATH=src python benchmarks/bench_server_chaos.py --quick               # 4 clients, 15 s (archived)
    PYTHONPATH=src python benchmarks/bench_server_chaos.py --max-body-bytes 16777216   # 10 MB is tokenized too

Writes benchmarks/results/server_chaos.json; summary: lost_or_mixed_answers, health_p99_ms,
normal_request_p99_s, server_tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, machine, write_result  # noqa: E402

KINDS = {"normal": 5, "stream": 3, "abandoned": 2, "oversized": 1, "malformed": 2}  # relative frequency
TOPICS = ["the moon", "rivers", "bread", "volcanoes", "owls", "glass", "chess", "honey", "trains", "coral reefs",
          "clocks", "salt", "kites", "copper", "tea", "bridges", "whales", "maps", "snow", "paper", "bees",
          "lighthouses", "cheese", "comets"]  # fmt: skip


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def prompts(n: int) -> list[dict]:
    """n distinct requests, half chat and half plain completions."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Question {i + 1}: write two short sentences about {topic}."
        if i % 2:
            out.append({"id": i, "chat": True, "body": {"messages": [{"role": "user", "content": text}]}})
        else:
            out.append({"id": i, "chat": False, "body": {"prompt": f"Two short facts about {topic}:\n1. {topic.capitalize()}"}})
    return out


MALFORMED = [
    b"{not json",
    b'{"model": "MODEL", "prompt": "hi", "temperature": NaN}',
    b'{"model": "MODEL", "prompt": "hi \\ud800"}',
    b'{"model": "MODEL", "prompt": "hi", "seed": 9223372036854775808}',
    b'{"model": "MODEL", "prompt": "hi", "max_tokens": -5}',
    b'{"model": "no-such-model", "prompt": "hi"}',
    b'{"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"model": "MODEL", "messages": "hello"}',
    b"[" * 5000,
]


class Chaos:
    def __init__(self, args, base: str, name: str):
        self.args, self.base, self.name = args, base, name
        self.pool = prompts(args.prompts)
        self.refs: dict[int, str] = {}
        self.lock = threading.Lock()
        self.outcomes: dict[str, Counter] = {k: Counter() for k in (*KINDS, "huge")}
        self.latency: dict[str, list[float]] = {"normal": [], "stream_total": [], "stream_first_chunk": []}
        self.failures: list[dict] = []
        self.inflight_disruptive = 0  # 10 MB requests and abandoned requests now in flight
        self.health: list[tuple[float, bool]] = []  # (seconds, disruptive request in flight)
        self.stop = threading.Event()

    # ---- requests ------------------------------------------------------------------------------
    def url(self, item) -> str:
        return self.base + ("/v1/chat/completions" if item["chat"] else "/v1/completions")

    def body(self, item, **extra) -> dict:
        return {"model": self.name, **item["body"], "max_tokens": self.args.max_tokens, "temperature": 0, **extra}

    def answer(self, client: httpx.Client, item, stream: bool) -> tuple[str | None, str, float | None]:
        """(text or None, outcome detail, first-chunk seconds) of one request."""
        t0 = time.perf_counter()
        if not stream:
            r = client.post(self.url(item), json=self.body(item))
            if r.status_code != 200:
                return None, f"http {r.status_code}", None
            choice = r.json()["choices"][0]
            return (choice["message"]["content"] if item["chat"] else choice["text"]), "ok", None
        parts, first, done = [], None, False
        with client.stream("POST", self.url(item), json=self.body(item, stream=True)) as r:
            if r.status_code != 200:
                r.read()
                return None, f"http {r.status_code}", None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return None, "stream error event", first
                choice = ev["choices"][0]
                parts.append((choice["delta"].get("content") or "") if item["chat"] else choice["text"])
        return ("".join(parts), "ok", first) if done else (None, "stream ended without [DONE]", first)

    def judge(self, kind: str, item, text: str | None, detail: str) -> str:
        if text is None:
            return "rejected_busy" if detail == "http 503" else "lost"
        if text == self.refs[item["id"]]:
            return "served"
        others = [i for i, ref in self.refs.items() if i != item["id"] and ref == text]
        return "mixed" if others else "wrong"

    def record(self, kind: str, outcome: str, info: dict | None = None) -> None:
        with self.lock:
            self.outcomes[kind][outcome] += 1
            if outcome in ("lost", "mixed", "wrong", "unexpected") and len(self.failures) < 50:
                self.failures.append({"kind": kind, "outcome": outcome, **(info or {})})

    def disruptive(self, delta: int) -> None:
        with self.lock:
            self.inflight_disruptive += delta

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        item = rng.choice(self.pool)
        if kind in ("normal", "stream"):
            t0 = time.perf_counter()
            try:
                text, detail, first = self.answer(client, item, stream=kind == "stream")
            except (httpx.HTTPError, ValueError, KeyError) as e:
                text, detail, first = None, f"{type(e).__name__}: {e}", None
            dt = time.perf_counter() - t0
            outcome = self.judge(kind, item, text, detail)
            if outcome == "served":
                with self.lock:
                    if kind == "normal":
                        self.latency["normal"].append(dt)
                    else:
                        self.latency["stream_total"].append(dt)
                        if first is not None:
                            self.latency["stream_first_chunk"].append(first)
            self.record(kind, outcome, {"prompt": item["id"], "detail": detail, "got": text,
                                        "want": self.refs[item["id"]]})  # fmt: skip
        elif kind == "abandoned":
            self.abandon(item, rng)
        elif kind == "oversized":
            self.expect_4xx(client, "oversized", b'{"model": "%s", "prompt": "' % self.name.encode() + b"a" * (2 << 20) + b'"}')
        else:
            raw = rng.choice(MALFORMED).replace(b"MODEL", self.name.encode())
            self.expect_4xx(client, "malformed", raw)

    def abandon(self, item, rng: random.Random) -> None:
        """A long request whose client leaves: a stream after its first chunk, or a plain request after 0.3 s."""
        self.disruptive(+1)
        streamed = rng.random() < 0.5
        try:
            with httpx.Client(timeout=30 if streamed else 0.3) as c:
                if not streamed:
                    try:
                        c.post(self.url(item), json=self.body(item, max_tokens=self.args.abandoned_tokens))
                        self.record("abandoned", "finished_before_leaving")
                    except httpx.TimeoutException:
                        self.record("abandoned", "left_while_waiting")
                else:
                    body = self.body(item, max_tokens=self.args.abandoned_tokens, stream=True)
                    with c.stream("POST", self.url(item), json=body) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                break
                    self.record("abandoned", "left_mid_stream" if r.status_code == 200 else f"http_{r.status_code}")
        except httpx.HTTPError as e:
            self.record("abandoned", f"client_error_{type(e).__name__}")
        finally:
            self.disruptive(-1)

    def expect_4xx(self, client: httpx.Client, kind: str, raw: bytes) -> None:
        try:
            r = client.post(self.base + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
            err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
            shaped = set(err) == {"message", "type", "param", "code"}
            ok = 400 <= r.status_code < 500 and shaped
            self.record(kind, "rejected" if ok else "unexpected", None if ok else {"status": r.status_code, "body": r.text[:300]})
        except httpx.HTTPError as e:
            self.record(kind, "unexpected", {"detail": f"{type(e).__name__}: {e}"})

    # ---- loops ---------------------------------------------------------------------------------
    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=self.args.request_timeout) as client:
            while not self.stop.is_set():
                self.one(client, rng)

    def huge_loop(self) -> None:
        """A 10 MB request every few seconds (413 under the default body limit)."""
        body = b'{"model": "%s", "max_tokens": 4, "prompt": "' % self.name.encode() + b"word " * (2 << 20) + b'"}'
        with httpx.Client(timeout=self.args.request_timeout) as client:
            while not self.stop.wait(self.args.huge_every):
                self.disruptive(+1)
                try:
                    r = client.post(self.base + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
                    shaped = "error" in r.json() if r.status_code >= 400 else False
                    self.record("huge", f"http_{r.status_code}" if shaped or r.status_code == 200 else "unexpected")
                except (httpx.HTTPError, ValueError) as e:
                    self.record("huge", "unexpected", {"detail": f"{type(e).__name__}: {e}"})
                finally:
                    self.disruptive(-1)

    def health_loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.wait(self.args.health_every):
                busy = self.inflight_disruptive > 0
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.base + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0 if ok else float("inf")
                with self.lock:
                    self.health.append((dt, busy or self.inflight_disruptive > 0))

    def references(self) -> None:
        with httpx.Client(timeout=self.args.request_timeout) as client:
            for item in self.pool:
                text, detail, _ = self.answer(client, item, stream=False)
                if text is None:
                    raise SystemExit(f"reference request for prompt {item['id']} failed: {detail}")
                self.refs[item["id"]] = text

    def run(self) -> None:
        threads = [threading.Thread(target=self.client_loop, args=(self.args.seed + i,), daemon=True)
                   for i in range(self.args.clients)]  # fmt: skip
        threads += [threading.Thread(target=self.huge_loop, daemon=True), threading.Thread(target=self.health_loop, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(self.args.duration)
        self.stop.set()
        for t in threads:
            t.join(timeout=self.args.request_timeout + 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leanlm", "serve", args.model, "--port", str(port), "--name", args.model,
           "--max-queue", str(args.max_queue), "--max-body-bytes", str(args.max_body_bytes),
           "--max-tokens-limit", str(max(args.max_tokens, args.abandoned_tokens))]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_active:
        cmd += ["--max-active", str(args.max_active)]
    log = log_path.open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    ap.add_argument("--prompts", type=int, default=24, help="distinct prompts (each gets a reference answer)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens per normal / streaming answer")
    ap.add_argument("--abandoned-tokens", type=int, default=256, help="tokens an abandoned request asks for")
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="server body limit (default: its default)")
    ap.add_argument("--huge-every", type=float, default=3.0, help="seconds between 10 MB requests")
    ap.add_argument("--health-every", type=float, default=0.05, help="seconds between /health probes")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads (default: all cores)")
    ap.add_argument("--max-active", type=int, default=None, help="server --max-active (default: the server's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 clients for 15 s (an archived, partial result)")
    add_result_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.duration = 4, 15.0

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"leanlm-chaos-server-{port}.log"
    proc = start_server(args, port, log_path)
    try:
        wait_ready(base, proc, timeout=600)
        chaos = Chaos(args, base, args.model)
        chaos.references()
        distinct = len(set(chaos.refs.values()))
        if distinct < len(chaos.refs):  # two prompts with one answer: a swap between them would go unseen
            print(f"warning: only {distinct} of {len(chaos.refs)} reference answers are distinct", file=sys.stderr)
        t0 = time.perf_counter()
        chaos.run()
        elapsed = time.perf_counter() - t0
        time.sleep(2)  # abandoned generations finish their cancellation
        metrics = httpx.get(base + "/metrics", timeout=30).text
        queue_after = httpx.get(base + "/health", timeout=30).json().get("queue_depth")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    server_log = log_path.read_text(errors="replace")
    tracebacks = server_log.count("Traceback (most recent call last)")

    def metric(name: str) -> float | None:
        for line in metrics.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    counts = {k: dict(v) for k, v in chaos.outcomes.items()}
    lost = sum(v.get("lost", 0) for v in chaos.outcomes.values())
    mixed = sum(v.get("mixed", 0) for v in chaos.outcomes.values())
    wrong = sum(v.get("wrong", 0) for v in chaos.outcomes.values())
    unexpected = sum(v.get("unexpected", 0) for v in chaos.outcomes.values())
    health_all = [dt for dt, _ in chaos.health]
    health_busy = [dt for dt, busy in chaos.health if busy]
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    s = lambda x: None if x is None else round(x, 3)  # noqa: E731
    served = sum(v.get("served", 0) for v in chaos.outcomes.values())
    summary = {
        "lost_or_mixed_answers": lost + mixed + wrong,
        "health_p99_ms": ms(percentile(health_busy, 99)),
        "normal_request_p99_s": s(percentile(chaos.latency["normal"], 99)),
        "normal_request_p50_s": s(percentile(chaos.latency["normal"], 50)),
        "server_tracebacks": tracebacks,
        "distinct_reference_answers": f"{distinct}/{len(chaos.refs)}",
        "unexpected_rejections": unexpected,
        "served": served,
        "rejected": sum(v.get("rejected", 0) for v in chaos.outcomes.values()),
        "rejected_busy_503": sum(v.get("rejected_busy", 0) for v in chaos.outcomes.values()),
        "lost": lost, "mixed": mixed, "wrong": wrong,
    }  # fmt: skip
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("archive", "machine_shared")},
        "machine": machine(),
        "elapsed_s": round(elapsed, 1),
        "distinct_reference_answers": distinct,
        "counts": counts,
        "latency_s": {k: {"n": len(v), "p50": s(percentile(v, 50)), "p99": s(percentile(v, 99))}
                      for k, v in chaos.latency.items()},  # fmt: skip
        "health_ms": {
            "probes": len(health_all), "p50": ms(percentile(health_all, 50)), "p99": ms(percentile(health_all, 99)),
            "max": ms(max(health_all, default=None)),
            "while_disruptive": {"probes": len(health_busy), "p50": ms(percentile(health_busy, 50)),
                                 "p99": ms(percentile(health_busy, 99)), "max": ms(max(health_busy, default=None))},
        },  # fmt: skip
        "server": {"cancelled_total": metric("leanlm_cancelled_total"), "queue_depth_after": queue_after,
                   "completion_tokens_total": metric("leanlm_completion_tokens_total"), "tracebacks": tracebacks},
        "failures": chaos.failures,
        "summary": summary,
    }  # fmt: skip
    print(json.dumps({"summary": summary, "counts": counts, "health_ms": result["health_ms"]}, indent=2))
    if tracebacks:
        print(f"server log with tracebacks: {log_path}", file=sys.stderr)
    write_result("server_chaos", result, partial=args.quick, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
