"""`leanlm hw calibrate`: measure this machine's profile with micro-benchmarks of the runtime.

- weight streaming: batch-1 GEMVs over ~200 MB of weights (far beyond the caches) per dtype,
  through the runtime's own Linear (and torch's int8 weight-only kernel when it exists);
- matrix throughput: 512-row products (prefill) per dtype, through the same Linear;
- fixed overheads: decode steps of narrow 2- and 30-layer models (their matmuls are tiny, so
  what remains is op dispatch), split into per-layer and per-step parts.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from tqdm.auto import tqdm

from .profiles import HardwareProfile


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gemv_bandwidth(dtype: torch.dtype, total_mb: int = 200, repeats: int = 7) -> float:
    from ..model.runtime import Linear

    n = max(1, int(total_mb * 2**20 / (1536 * 576 * torch.tensor([], dtype=dtype).element_size())))
    layers = [Linear(576, 1536, bias=False).to(dtype) for _ in range(n)]
    x = torch.randn(1, 1, 576, dtype=dtype)
    nbytes = sum(l.weight.numel() * l.weight.element_size() for l in layers)

    def run():
        for l in layers:
            l(x)

    with torch.inference_mode():
        return nbytes / _median_time(run, repeats) / 1e9


def _int8_bandwidth(total_mb: int = 200, repeats: int = 7) -> float | None:
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return None
    n = max(1, int(total_mb * 2**20 / (1536 * 576)))
    ws = [torch.randint(-128, 127, (1536, 576), dtype=torch.int8) for _ in range(n)]
    scales = torch.rand(1536, dtype=torch.bfloat16)
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    try:
        op(x, ws[0], scales)
    except RuntimeError:
        return None

    def run():
        for w in ws:
            op(x, w, scales)

    return n * 1536 * 576 / _median_time(run, repeats) / 1e9


def _gemm_tflops(dtype: torch.dtype, repeats: int = 5) -> float:
    from ..model.runtime import Linear

    lin = Linear(576, 1536, bias=False).to(dtype)
    x = torch.randn(1, 512, 576, dtype=dtype)
    with torch.inference_mode():
        t = _median_time(lambda: lin(x), repeats)
    return 2 * 512 * 576 * 1536 / t / 1e12


def _overheads(dtype: torch.dtype, steps: int = 40) -> tuple[float, float]:
    from transformers import LlamaConfig

    from ..model.config import ModelConfig
    from ..model.runtime import Transformer

    def step_time(n_layers: int) -> float:
        # SmolLM2's attention shape (9 q / 3 kv heads of 64) on a 72-wide residual: real op count, tiny matmuls
        hf = LlamaConfig(vocab_size=256, hidden_size=72, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)  # fmt: skip
        m = Transformer(ModelConfig.from_hf(hf)).to(dtype).eval()
        m.setup_cache(1, steps + 40)
        tok = torch.tensor([[5]])
        with torch.inference_mode():
            for i in range(10):
                m(tok, start=i)

            def run():
                for i in range(steps):
                    m(tok, start=10 + i)

            return _median_time(run, 5) / steps

    t2, t30 = step_time(2), step_time(30)
    per_layer = (t30 - t2) / 28
    return per_layer * 1e6, max(0.0, t2 - 2 * per_layer) * 1e6


def calibrate(threads: int | None = None, progress: bool = True) -> HardwareProfile:
    if threads:
        torch.set_num_threads(threads)
    steps = ["fp32 GEMV", "bf16 GEMV", "int8 GEMV", "fp32 GEMM", "bf16 GEMM", "overheads fp32", "overheads bf16"]
    bar = tqdm(steps, desc="calibrating", disable=not progress)
    bw32 = _gemv_bandwidth(torch.float32); bar.update()  # noqa: E702
    bw16 = _gemv_bandwidth(torch.bfloat16); bar.update()  # noqa: E702
    bw8 = _int8_bandwidth(); bar.update()  # noqa: E702
    tf32 = _gemm_tflops(torch.float32); bar.update()  # noqa: E702
    tf16 = _gemm_tflops(torch.bfloat16); bar.update()  # noqa: E702
    lo32, so32 = _overheads(torch.float32); bar.update()  # noqa: E702
    lo16, so16 = _overheads(torch.bfloat16); bar.update()  # noqa: E702
    bar.close()
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    weight_bw = {"fp32": bw32, "bf16": bw16}
    if bw8:
        weight_bw["int8"] = bw8
    return HardwareProfile(
        name="cpu", mem_bw_gbs=bw32, mem_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        peak_tflops={"fp32": tf32, "bf16": tf16, "fp16": tf16}, bw_efficiency=1.0, compute_efficiency=1.0,
        layer_overhead_us=statistics.mean([lo32, lo16]), step_overhead_us=statistics.mean([so32, so16]),
        weight_bw_gbs=weight_bw, source=f"measured by leanlm hw calibrate on {cpu or 'this CPU'}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}",
    )  # fmt: skip

