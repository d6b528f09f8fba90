"""Load test of `leanlm serve`: the official `openai` client at 1, 4, 8, 16 and 32 concurrent clients
against a server process with continuous batching, beside the same server with --max-active 1 (one
request at a time: the serial server), both started by this run.

Two server processes (`python -m leanlm serve MODEL`, the command users run) are up for the whole run:
the batched one (the default --max-active) and the serial one (--max-active 1). Every prompt of the pool
is first asked once, alone and greedily, of the serial server: its reference answer, the sequential run.
Then the batched server gets one 8-client warm-up (kept apart from the figures; its answers are checked
too), and each level sends 2 x clients requests (at least 4) from `clients` threads, each thread one
request after another (closed loop), prompts taken in turn from the pool; every answer must equal its
prompt's reference. An answer that differs is *mixed* when it equals another prompt's reference and *wrong*
otherwise; a request without a complete answer is *lost*. Throughput is completion tokens (the
server's usage counts) per second of the level's wall time; latency is per request.

The 8-client figure is measured on both servers in alternating rounds (serial, batched, serial,
batched, ...) so load from other jobs on the machine hits both alike; the summary's
throughput_8_clients_vs_serial is the median over the rounds (3 by default) of (batched tok/s / serial
tok/s) of the same round.

    PYTHONPATH=src python benchmarks/bench_serve_load.py --machine-shared      # smollm2-135m bf16
    PYTHONPATH=src python benchmarks/bench_serve_load.py --quick               # 1, 4, 8 clients, 1 round (archived)

Writes benchmarks/results/serve_load.json; summary: throughput_8_clients_vs_serial, mixed_or_lost_answers,
tok_s and p50/p99 latency per client count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, os.path.dirname(__file__))
from bench_server_chaos import free_port, percentile, prompts, wait_ready  # noqa: E402
from common import add_result_args, machine, write_result  # noqa: E402


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class Server:
    def __init__(self, args, max_active: int | None, tag: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "leanlm", "serve", args.model, "--port", str(self.port), "--name", args.model,
                    "--dtype", args.dtype, "--max-queue", "256", "--max-tokens-limit", str(args.max_tokens)]  # fmt: skip
        if max_active is not None:
            self.cmd += ["--max-active", str(max_active)]
        if args.threads:
            self.cmd += ["--threads", str(args.threads)]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"leanlm-load-{tag}-{self.port}.log"
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.base + "/metrics", timeout=60).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.log_path.read_text(errors="replace").count("Traceback (most recent call last)")


class Load:
    def __init__(self, args):
        self.args = args
        self.pool = prompts(args.prompts)
        self.refs: dict[int, str] = {}
        self.totals = {"served": 0, "mixed": 0, "wrong": 0, "lost": 0}
        self.failures: list[dict] = []

    def ask(self, client: openai.OpenAI, item) -> tuple[str, int]:
        """(answer text, completion tokens) of one greedy request."""
        body = item["body"]
        if item["chat"]:
            r = client.chat.completions.create(model=self.args.model, messages=body["messages"], temperature=0,
                                               max_tokens=self.args.max_tokens)  # fmt: skip
            return r.choices[0].message.content or "", r.usage.completion_tokens
        r = client.completions.create(model=self.args.model, prompt=body["prompt"], temperature=0,
                                      max_tokens=self.args.max_tokens)  # fmt: skip
        return r.choices[0].text, r.usage.completion_tokens

    def client(self, server: Server) -> openai.OpenAI:
        return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0,
                             timeout=self.args.request_timeout)  # fmt: skip

    def references(self, server: Server) -> None:
        c = self.client(server)
        for item in self.pool:
            self.refs[item["id"]] = self.ask(c, item)[0]

    def level(self, server: Server, clients: int, label: str) -> dict:
        n = max(4, 2 * clients)
        work = [self.pool[i % len(self.pool)] for i in range(n)]
        lock = threading.Lock()
        latencies, tokens, outcomes = [], [0], {"served": 0, "mixed": 0, "wrong": 0, "lost": 0}

        def worker():
            c = self.client(server)
            while True:
                with lock:
                    if not work:
                        return
                    item = work.pop(0)
                t0 = time.perf_counter()
                try:
                    text, used = self.ask(c, item)
                except (openai.OpenAIError, httpx.HTTPError) as e:
                    text, used, detail = None, 0, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with lock:
                    if text is None:
                        outcome = "lost"
                    elif text == self.refs[item["id"]]:
                        outcome = "served"
                    else:
                        outcome = "mixed" if text in (r for i, r in self.refs.items() if i != item["id"]) else "wrong"
                    outcomes[outcome] += 1
                    if outcome == "served":
                        latencies.append(dt)
                        tokens[0] += used
                    elif len(self.failures) < 20:
                        self.failures.append({"server": label, "clients": clients, "prompt": item["id"],
                                              "outcome": outcome, "got": text, "want": self.refs[item["id"]],
                                              **({"detail": detail} if text is None else {})})  # fmt: skip

        steps0, rows0 = server.metric("leanlm_decode_steps_total"), server.metric("leanlm_decode_rows_total")
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        steps, rows = server.metric("leanlm_decode_steps_total") - steps0, server.metric("leanlm_decode_rows_total") - rows0
        for k, v in outcomes.items():
            self.totals[k] += v
        row = {"server": label, "clients": clients, "requests": n, "completion_tokens": tokens[0], "wall_s": round(wall, 2),
               "tok_s": round(tokens[0] / wall, 2), "p50_s": _round(percentile(latencies, 50)),
               "p99_s": _round(percentile(latencies, 99)), "mean_batch": round(rows / steps, 2) if steps else None,
               **outcomes}  # fmt: skip
        print(json.dumps(row), flush=True)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--clients", default="1,4,8,16,32", help="client counts (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating serial / batched rounds at 8 clients")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (each gets a reference answer)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--max-active", type=int, default=None, help="batched server's --max-active (default: its default)")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads (default: all cores)")
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="1, 4 and 8 clients, 1 round (an archived, partial result)")
    add_result_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.rounds = "1,4,8", 1
    levels = [int(c) for c in args.clients.split(",")]

    batched, serial = Server(args, args.max_active, "batched"), Server(args, 1, "serial")
    load = Load(args)
    rows, rounds, warmup = [], [], None
    try:
        wait_ready(serial.base, serial.proc, timeout=900)
        wait_ready(batched.base, batched.proc, timeout=900)
        load.references(serial)
        distinct = len(set(load.refs.values()))
        if distinct < len(load.refs):
            print(f"warning: only {distinct} of {len(load.refs)} reference answers are distinct", file=sys.stderr)
        if batched.metric("leanlm_batching") != 1:
            raise SystemExit("the batched server does not batch (leanlm_batching 0 in /metrics)")
        warmup = load.level(batched, 8, "batched (warm-up)")  # the serial server is warm from the references
        for r in range(args.rounds):  # 8 clients on both servers, alternating
            s8, b8 = load.level(serial, 8, "serial"), load.level(batched, 8, "batched")
            rounds.append({"serial": s8, "batched": b8, "ratio": round(b8["tok_s"] / s8["tok_s"], 3) if s8["tok_s"] else None})
        for clients in levels:
            if clients == 8 and rounds:
                rows.append(rounds[-1]["batched"])
            else:
                rows.append(load.level(batched, clients, "batched"))
    finally:
        tracebacks = batched.stop() + serial.stop()
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    t = load.totals
    summary = {
        "throughput_8_clients_vs_serial": round(statistics.median(ratios), 3) if ratios else None,
        "mixed_or_lost_answers": t["mixed"] + t["wrong"] + t["lost"],
        "model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
        "tok_s_by_clients": {str(r["clients"]): r["tok_s"] for r in rows},
        "p50_s_by_clients": {str(r["clients"]): r["p50_s"] for r in rows},
        "p99_s_by_clients": {str(r["clients"]): r["p99_s"] for r in rows},
        "mean_batch_by_clients": {str(r["clients"]): r["mean_batch"] for r in rows},
        "serial_8_clients_tok_s": [r["serial"]["tok_s"] for r in rounds],
        "batched_8_clients_tok_s": [r["batched"]["tok_s"] for r in rounds],
        "answers_checked": sum(t.values()), "mixed": t["mixed"], "wrong": t["wrong"], "lost": t["lost"],
        "distinct_reference_answers": f"{distinct}/{len(load.refs)}", "server_tracebacks": tracebacks,
    }  # fmt: skip
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("archive", "machine_shared")},
        "machine": machine(),
        "servers": {"batched": batched.cmd[1:], "serial": serial.cmd[1:]},
        "levels": rows,
        "warmup_8_clients": warmup,
        "rounds_8_clients": rounds,
        "failures": load.failures,
        "summary": summary,
    }
    print(json.dumps(summary, indent=2))
    write_result("serve_load", result, partial=args.quick, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
