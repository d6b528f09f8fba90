"""Provenance stamps for every result leanlm writes (benchmarks and `leanlm eval --json`).

A figure is only as good as what can be said about where it came from: the code (git commit,
and whether the tree had uncommitted changes), the exact command, the machine (CPU model, ISA
flags, cores, caches) and the library versions. Speed differs several-fold between the CPUs
this project runs on, so a result without its machine cannot be compared with anything.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# ISA extensions that decide which kernels run (and so how fast): recorded by name
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _caches() -> dict:
    """Cache sizes by level, as sysfs gives them for CPU 0 (e.g. {"L1d": "32K", "L2": "1024K", "L3": "32768K"})."""
    out: dict[str, str] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(root.glob("index*")):
        try:
            level = (d / "level").read_text().strip()
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[f"L{level}{suffix}"] = size
    return out


def machine() -> dict:
    """What the figures depend on: CPU model, ISA flags, cores, caches, memory, threads in use."""
    import torch

    flags = set(_cpuinfo_field("flags").split())
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "caches": _caches(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
    }


def git_commit(repo: str | Path | None = None) -> dict:
    """{"commit": sha or None, "dirty": bool}: the code a result came from."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                            text=True, timeout=10)  # fmt: skip
        return {"commit": sha.stdout.strip(), "dirty": bool(st.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def stamp(command: str | list[str] | None = None, code: dict | None = None) -> dict:
    """The provenance block every result JSON carries under "provenance". `code`: the commit block
    (git_commit()) when the caller took it earlier, e.g. when a long run started; else read now."""
    import torch

    if command is None:
        command = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if not isinstance(command, str):
        command = shlex.join(command)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("transformers", "llama_cpp", "openvino_genai"):
        mod = sys.modules.get(pkg)
        if mod is not None and hasattr(mod, "__version__"):
            versions[pkg] = mod.__version__
    try:
        from importlib.metadata import version

        versions["leanlm"] = version("leanlm")
    except Exception:  # not installed as a distribution (a checkout on PYTHONPATH)
        pass
    return {
        **(git_commit() if code is None else code),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions,
    }
