"""llama.cpp's own tools and the GGUFs they make: leanlm.evaluate.llamacpp (the benchmarks and `leanlm optimize`
share it); this name stays for the benchmark scripts."""

from leanlm.evaluate.llamacpp import *  # noqa: F401,F403
from leanlm.evaluate.llamacpp import _convert_input, _run, _vendor_env  # noqa: F401
