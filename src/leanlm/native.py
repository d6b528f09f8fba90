"""Building leanlm's own C++ kernels (AVX2), once per machine.

Kernels are compiled with torch's `load_inline` on first use and cached by torch
(~/.cache/torch_extensions). Each kernel module keeps its C++ source and asks `build` for the
compiled module; `build` returns None (and the caller falls back to torch ops) when
LEANLM_NATIVE=0, when the CPU lacks AVX2/FMA, or when no compiler works.
"""

from __future__ import annotations

import functools
import os
import warnings


@functools.cache
def cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = " " + next((line for line in f if line.startswith("flags")), "") + " "
        return " avx2 " in flags and " fma " in flags
    except OSError:
        return False


_built: dict[str, object] = {}


def build(name: str, source: str, functions: list[str], cflags: tuple[str, ...] = ("-mavx2", "-mfma"),
          fallback: str = "torch's kernels"):  # fmt: skip
    """The compiled extension `name` (cached in-process), or None where it cannot be had."""
    if name not in _built:
        module = None
        if os.environ.get("LEANLM_NATIVE", "1") != "0" and cpu_has_avx2_fma():
            try:
                from torch.utils.cpp_extension import load_inline

                # -fopenmp: at::parallel_for is a header template that runs serially without it
                module = load_inline(name, cpp_sources=source, functions=functions,
                                     extra_cflags=["-O3", "-fopenmp", *cflags], extra_ldflags=["-fopenmp"],
                                     verbose=False)  # fmt: skip
            except Exception as e:  # no compiler / headers: the caller's fallback still works
                warnings.warn(f"leanlm: native kernel {name} unavailable ({type(e).__name__}: {str(e)[:200]}); "
                              f"using {fallback}")  # fmt: skip
        _built[name] = module
    return _built[name]
