"""Where search trials run: here, one after another (`local`), or on a Ray cluster (`ray`).

A backend maps one function over a list of trial arguments and returns the results in input order.
On Ray each trial asks for every CPU of a node (the smallest node's count), so at most one trial runs on
a node at a time and its decode timings are not disturbed by a neighbour; trials spread over nodes.
Connect to a running cluster with `address` (`ray start --head` prints it; `auto` finds the local one).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import LeanlmError

BACKENDS = ("local", "ray")


class LocalBackend:
    name = "local"

    def map(self, fn: Callable, items: list[tuple], on_done: Callable[[Any], None] | None = None) -> list:
        out = []
        for args in items:
            out.append(_tag_node(fn(*args)))
            if on_done:
                on_done(out[-1])
        return out

    def describe(self) -> dict:
        return {"backend": "local", "nodes": 1}


class RayBackend:
    """One trial per node: each task reserves all CPUs of the smallest alive node."""

    name = "ray"

    def __init__(self, address: str | None = "auto"):
        try:
            import ray
        except ImportError as e:
            raise LeanlmError("--backend ray needs the ray package: pip install 'ray[default]' "
                              "(or run with --backend local)") from e  # fmt: skip
        self.ray = ray
        if not ray.is_initialized():
            try:
                # the trials read the same data folder and model cache as this process
                env = {k: os.environ[k] for k in ("LEANLM_DATA", "LEANLM_CACHE", "HF_HOME") if k in os.environ}
                ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                         log_to_driver=False, include_dashboard=False)  # fmt: skip
            except ConnectionError as e:
                raise LeanlmError(f"no Ray cluster at address {address!r}: start one with `ray start --head` "
                                  "or pass --ray-address HOST:PORT") from e  # fmt: skip
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
        if not nodes or min(cpus) < 1:
            raise LeanlmError("the Ray cluster has no node with a CPU; check `ray status`")
        self.nodes, self.cpus_per_trial = len(nodes), min(cpus)

    def map(self, fn: Callable, items: list[tuple], on_done: Callable[[Any], None] | None = None) -> list:
        ray = self.ray
        task = ray.remote(num_cpus=self.cpus_per_trial, max_retries=0)(_run_on_node)
        refs = [task.remote(fn, args, self.cpus_per_trial) for args in items]
        index = {r: i for i, r in enumerate(refs)}
        out: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                out[index[r]] = ray.get(r)
                if on_done:
                    on_done(out[index[r]])
        return out

    def describe(self) -> dict:
        return {"backend": "ray", "nodes": self.nodes, "cpus_per_trial": self.cpus_per_trial}


def _tag_node(result):
    import platform

    if isinstance(result, dict):
        result["node"] = platform.node()
    return result


def _run_on_node(fn: Callable, args: tuple, threads: int):
    import torch

    # a Ray worker starts with one thread; the trial reserved `threads` CPUs of its node
    torch.set_num_threads(threads)
    return _tag_node(fn(*args))


def make_backend(name: str, address: str | None = None):
    if name == "local":
        if address:
            raise LeanlmError("--ray-address is only used with --backend ray")
        return LocalBackend()
    if name == "ray":
        return RayBackend(address or "auto")
    raise LeanlmError(f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}")
