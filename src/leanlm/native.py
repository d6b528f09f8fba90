"""Building leanlm's C++ kernels (src/leanlm/csrc), once per machine, for the machine's ISA.

The kernels are one translation unit (csrc/extension.cpp includes every family), compiled with
torch's `cpp_extension.load` on first use and cached by torch (~/.cache/torch_extensions). The
extension's name carries a hash of every csrc file, the compiler flags and the torch version, so
an edited kernel builds afresh and nothing is renamed by hand.

ISA dispatch: at run time the CPU's flags (/proc/cpuinfo) say which levels of LEVELS it supports,
and one level's build is loaded (each level is a separate extension; a machine builds only the one it
uses). Every level is AVX2 + FMA at heart: the kernels are written with 256-bit intrinsics, and the
higher levels compile the same code with their -m flags, plus the variants the compiler's feature
macros select. qlinear.cpp's GEMV also carries a copy with its own AVX512-VNNI target attribute, which
runs where the CPU has VNNI whatever the level (one VNNI instruction where two AVX2 ones do the same exact
integer sums). All levels give the same numbers bit for bit. The default is the best level up to
DEFAULT_LEVEL: on an AVX-512 EPYC the avx512_bf16 build decoded Gemma-3-270M in bf16 more slowly than
the AVX2 build (benchmarks/bench_ab_commits.py before/after runs; LEANLM_ISA A/B), and no kernel has a
wider variant yet that would pay for it. LEANLM_ISA=<level> asks for a given level (A/B runs, or a
machine where a wider build measures faster); when a level fails to build (an old compiler without
its flags) the next lower one is tried, with a warning.

Prefill's kernels (gemm_int8.cpp: the low-bit GEMM on AVX512-VNNI; attention_prefill.cpp and prefill_glue.cpp:
attention, RMSNorm and the GLU for many rows on AVX-512) carry their own target attributes instead: every
build contains them whatever its level, and ops.q_gemm_usable / prefill_attention_usable say whether this
CPU runs them (elsewhere the runtime keeps ATen's paths). bf16 multi-row products stay bf16 on oneDNN where
the CPU has bf16 dot products (`bf16_matmul`).

`extension()` returns None, and callers fall back to torch's ops, when LEANLM_NATIVE=0, when the
CPU lacks AVX2/FMA or when no compiler works (a warning says which and why).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from .errors import LeanlmError

CSRC = Path(__file__).resolve().parent / "csrc"

# (level, CPU flags it needs on top of the levels before it, compiler flags it adds), lowest first
LEVELS = (
    ("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    ("avx512", ("avx512f", "avx512bw", "avx512vl"), ("-mavx512f", "-mavx512bw", "-mavx512vl")),
    ("avx512_vnni", ("avx512_vnni",), ("-mavx512vnni",)),
    ("avx512_bf16", ("avx512_bf16",), ("-mavx512bf16",)),
    ("amx", ("amx_tile", "amx_int8", "amx_bf16"), ("-mamx-tile", "-mamx-int8", "-mamx-bf16")),
)
LEVEL_NAMES = tuple(name for name, _, _ in LEVELS)
DEFAULT_LEVEL = "avx2"  # the highest level built unless LEANLM_ISA asks for another (see the module docstring)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def supported_levels(flags: set[str] | None = None) -> list[str]:
    """The ISA levels this CPU runs, lowest first (each needs every flag of the levels before it)."""
    flags = cpu_flags() if flags is None else flags
    out = []
    for name, need, _ in LEVELS:
        if not all(f in flags for f in need):
            break
        out.append(name)
    return out


def compile_flags(level: str) -> list[str]:
    """Compiler flags of a level: its own and those of every level below it."""
    out: list[str] = []
    for name, _, flags in LEVELS:
        out += flags
        if name == level:
            return out
    raise LeanlmError(f"unknown ISA level {level!r}; use one of {', '.join(LEVEL_NAMES)}")


def source_files() -> list[Path]:
    """The kernel sources shipped with the package (csrc/*.cpp, *.inc and *.h)."""
    return sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.inc"), *CSRC.glob("*.h")])


def extension_name(level: str) -> str:
    """leanlm_kernels_<level>_<hash of the sources, the flags, the torch version and where the sources are>.

    (The path too: torch rebuilds an extension whose build command changed, so two checkouts sharing a
    name would rebuild each other's in turn.)"""
    import torch

    h = hashlib.sha256(str(CSRC).encode())
    for p in source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(_cflags(level)).encode() + torch.__version__.encode())
    return f"leanlm_kernels_{level}_{h.hexdigest()[:12]}"


def _cflags(level: str) -> list[str]:
    # -fopenmp: at::parallel_for is a header template that runs serially without it
    return ["-O3", "-fopenmp", *compile_flags(level)]


def wanted_level() -> str | None:
    """The level to build: LEANLM_ISA when set (it must be one this CPU runs), else the best one up to
    DEFAULT_LEVEL."""
    levels = supported_levels()
    asked = os.environ.get("LEANLM_ISA", "").strip()
    if asked:
        if asked not in LEVEL_NAMES:
            raise LeanlmError(f"LEANLM_ISA={asked!r} is not an ISA level; use one of {', '.join(LEVEL_NAMES)}")
        if asked not in levels:
            raise LeanlmError(f"LEANLM_ISA={asked!r}: this CPU lacks it (it runs {', '.join(levels) or 'none'}); "
                              "unset LEANLM_ISA or pick one of those")  # fmt: skip
        return asked
    capped = [lv for lv in levels if LEVEL_NAMES.index(lv) <= LEVEL_NAMES.index(DEFAULT_LEVEL)]
    return capped[-1] if capped else None


_state: dict = {}


def extension():
    """The compiled kernels for this machine (cached in-process), or None where they cannot be had."""
    if "ext" not in _state:
        _state["ext"], _state["why"] = _build()
    return _state["ext"]


def status() -> dict:
    """What `extension()` gave: {"level": ISA level or None, "name": extension name, "why": reason when None}."""
    ext = extension()
    return {"level": None if ext is None else ext.isa(), "name": _state.get("name"), "why": _state["why"]}


def _build():
    if os.environ.get("LEANLM_NATIVE", "1") == "0":
        return None, "disabled (LEANLM_NATIVE=0)"
    level = wanted_level()
    if level is None:
        return None, "the CPU lacks AVX2/FMA"
    from torch.utils.cpp_extension import load

    errors = []
    for lvl in reversed(LEVEL_NAMES[: LEVEL_NAMES.index(level) + 1]):
        name = extension_name(lvl)
        _state["name"] = name
        try:
            ext = load(name, sources=[str(CSRC / "extension.cpp")], extra_include_paths=[str(CSRC)],
                       extra_cflags=_cflags(lvl), extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
        except Exception as e:  # no compiler / headers / flags: try the level below, then torch's ops
            errors.append(f"{lvl}: {type(e).__name__}: {str(e)[:200]}")
            continue
        if errors:
            warnings.warn(f"leanlm: native kernels built for {lvl}, not {level} ({'; '.join(errors)})")
        return ext, None
    why = "no working C++ compiler (" + "; ".join(errors) + ")"
    warnings.warn(f"leanlm: native kernels unavailable, {why}; using torch's ops (slower decode)")
    return None, why


def bf16_matmul() -> bool:
    """Do bf16 multi-row products run on bf16 dot products here (AVX512-BF16 or AMX-BF16, through
    oneDNN)? Then the runtime keeps bf16 GEMMs in bf16 instead of widening them to fp32 (model.runtime.
    upcast_for_matmul). LEANLM_BF16_GEMM=0 / 1 overrides the CPU check (A/B runs)."""
    if "bf16" not in _state:
        asked = os.environ.get("LEANLM_BF16_GEMM", "").strip()
        if asked not in ("", "0", "1"):
            raise LeanlmError(f"LEANLM_BF16_GEMM={asked!r}: use 0 (widen to fp32), 1 (bf16 GEMMs) or leave it unset")
        if asked:
            _state["bf16"] = asked == "1"
        else:
            import torch

            flags = cpu_flags()
            _state["bf16"] = bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    return _state["bf16"]

