"""`leanlm hw calibrate`: measure this machine's profile with micro-benchmarks of the runtime.

- weight streaming: batch-1 GEMVs over ~100-200 MB of weights (far beyond the caches) per
  format, through the kernels the fused decode step calls (leanlm's small-row product for
  fp32/bf16, q_linear for int8 per-channel and int4 group-128), called directly: the per-call
  cost of a Python module is not paid at decode, and the per-layer overhead below covers the rest;
- matrix throughput: 512-row products (prefill) per dtype through the same layers (quantized
  layers dequantize first, so they get their own figure);
- fixed overheads: decode steps of narrow 2- and 30-layer models (their matmuls are tiny, so
  what remains is op dispatch), split into per-layer and per-step parts;
- prefill overhead per token and layer: a 512-token prefill of narrow 2- and 8-layer models,
  minus what the roofline prices for them (norms, RoPE, casts, attention inefficiency).
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
    from .. import ops
    from ..model.runtime import Linear

    n = max(1, int(total_mb * 2**20 / (1536 * 576 * torch.tensor([], dtype=dtype).element_size())))
    layers = [Linear(576, 1536, bias=False).to(dtype) for _ in range(n)]
    x = torch.randn(1, 1, 576, dtype=dtype)
    nbytes = sum(l.weight.numel() * l.weight.element_size() for l in layers)
    native = ops.available()

    def run():  # the kernel the decode step calls from C++, without a Python module call per layer
        for l in layers:
            ops.small_linear(x[0], l.weight) if native else l(x)

    with torch.inference_mode():
        return nbytes / _median_time(run, repeats) / 1e9


def _quant_layers(bits: int, n: int) -> list:
    """n SmolLM2-shaped (576 -> 1536) weight-only quantized layers, as the quantizers build them."""
    from ..quant.config import QSpec
    from ..quant.packed import QuantLinear
    from ..quant.rtn import rtn

    spec = QSpec(8, 0, True) if bits == 8 else QSpec(4, 128, False)  # the recipes' int8 / int4 settings
    return [QuantLinear(rtn(torch.randn(1536, 576) * 0.02, spec)) for _ in range(n)], spec


def _quant_bandwidth(bits: int, total_mb: int = 100, repeats: int = 7) -> float:
    """Weight bytes/s of batch-1 GEMVs through the runtime's quantized layer (leanlm's own
    kernel where it builds), bytes counted as the cost model counts them (codes + scales/zeros)."""
    from .cost import _weight_bytes

    n = max(1, int(total_mb * 2**20 / (1536 * 576 * bits / 8)))
    layers, spec = _quant_layers(bits, n)
    x = torch.randn(1, 1, 576, dtype=torch.bfloat16)
    nbytes = n * _weight_bytes(1536 * 576, f"int{bits}", spec.group or None)
    direct = all(l.backend == "native" for l in layers)
    if direct:
        from ..ops import q_linear as q

    def run():  # as the fused decode step calls q_linear (from C++), without QuantLinear.forward's overhead
        for l in layers:
            if direct:
                q(x[0], l.qweight, l.scales, l.zeros, l.spec.bits, l.kgroup)
            else:
                l(x)

    with torch.inference_mode():
        return nbytes / _median_time(run, repeats) / 1e9


def _quant_gemm_tflops(bits: int, repeats: int = 5) -> float:
    """512-row products through the quantized layer (they dequantize, then multiply)."""
    (lin,), _ = _quant_layers(bits, 1)
    x = torch.randn(1, 512, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        t = _median_time(lambda: lin(x), repeats)
    return 2 * 512 * 576 * 1536 / t / 1e12


def _gemm_tflops(dtype: torch.dtype, repeats: int = 5) -> float:
    from ..model.runtime import Linear

    lin = Linear(576, 1536, bias=False).to(dtype)
    x = torch.randn(1, 512, 576, dtype=dtype)
    with torch.inference_mode():
        t = _median_time(lambda: lin(x), repeats)
    return 2 * 512 * 576 * 1536 / t / 1e12


def _narrow_model(n_layers: int, dtype: torch.dtype, hidden: int):
    from transformers import LlamaConfig

    from ..model.config import ModelConfig
    from ..model.runtime import Transformer

    # SmolLM2's attention shape (9 q / 3 kv heads of 64), tiny FFN: the real op count, small matmuls
    hf = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=64, num_hidden_layers=n_layers,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64)  # fmt: skip
    return Transformer(ModelConfig.from_hf(hf)).to(dtype).eval()


def _overheads(dtype: torch.dtype, steps: int = 40, rounds: int = 5) -> tuple[float, float]:
    """(per layer, per step) microseconds of a decode step that are not its matmuls.

    The 2-layer and 30-layer models are timed in alternation and each keeps its fastest round:
    another process on the machine only ever adds time, so the minimum is the figure that
    contention disturbs least (a median let a busy spell make 30 layers look cheaper than 2)."""

    def stepper(n_layers: int):
        m = _narrow_model(n_layers, dtype, hidden=72)
        m.setup_cache(1, 10 + rounds * steps + 1)
        tok = torch.tensor([[5]])
        pos = [0]

        def run():
            for _ in range(steps):
                m(tok, start=pos[0])
                pos[0] += 1

        with torch.inference_mode():
            for _ in range(10):  # warm-up
                m(tok, start=pos[0])
                pos[0] += 1
        return run

    runs = {2: stepper(2), 30: stepper(30)}
    best = {n: float("inf") for n in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for n, run in runs.items():
                t = time.perf_counter()
                run()
                best[n] = min(best[n], (time.perf_counter() - t) / steps)
    t2, t30 = best[2], best[30]
    per_layer = max(0.0, (t30 - t2) / 28)
    return per_layer * 1e6, max(0.0, t2 - 2 * per_layer) * 1e6


def _prefill_token_overhead(hw: HardwareProfile, dtype: torch.dtype, tokens: int = 512) -> float:
    """Microseconds per token per layer that a 512-token prefill spends beyond what the roofline
    prices (norms, RoPE, casts, the attention kernel's own inefficiency): measured prefill of
    a narrow 576-wide model minus the cost model's prediction for the same model."""
    from .cost import Plan, forward_cost

    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    times = {}
    for n_layers in (2, 8):
        m = _narrow_model(n_layers, dtype, hidden=576)
        ids = torch.randint(0, 256, (1, tokens))
        with torch.inference_mode():
            t = _median_time(lambda: m(ids, last_only=True), 3)  # noqa: B023
        plan = Plan(weight_dtype=name, compute_dtype=name)
        ops = forward_cost(m.config, hw, plan, 1, tokens, tokens, last_only=True)
        priced = sum(o.seconds for o in ops if not o.name.endswith("overhead"))
        times[n_layers] = (t, priced)
    (t2, p2), (t8, p8) = times[2], times[8]
    return max(0.0, ((t8 - p8) - (t2 - p2)) / 6 / tokens * 1e6)


def calibrate(threads: int | None = None, progress: bool = True) -> HardwareProfile:
    if threads:
        torch.set_num_threads(threads)
    steps = ["fp32 GEMV", "bf16 GEMV", "int8 GEMV", "int4 GEMV", "fp32 GEMM", "bf16 GEMM", "int8 GEMM", "int4 GEMM",
             "overheads fp32", "overheads bf16", "prefill fp32", "prefill bf16"]  # fmt: skip
    bar = tqdm(steps, desc="calibrating", disable=not progress)

    def step(fn, *args):
        out = fn(*args)
        bar.update()
        return out

    bw = {"fp32": step(_gemv_bandwidth, torch.float32), "bf16": step(_gemv_bandwidth, torch.bfloat16),
          "int8": step(_quant_bandwidth, 8), "int4": step(_quant_bandwidth, 4)}  # fmt: skip
    tf32, tf16 = step(_gemm_tflops, torch.float32), step(_gemm_tflops, torch.bfloat16)
    quant_tf = {"int8": step(_quant_gemm_tflops, 8), "int4": step(_quant_gemm_tflops, 4)}
    lo32, so32 = step(_overheads, torch.float32)
    lo16, so16 = step(_overheads, torch.bfloat16)
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hw = HardwareProfile(
        name="cpu", mem_bw_gbs=bw["fp32"], mem_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        peak_tflops={"fp32": tf32, "bf16": tf16, "fp16": tf16}, bw_efficiency=1.0, compute_efficiency=1.0,
        layer_overhead_us=statistics.mean([lo32, lo16]), step_overhead_us=statistics.mean([so32, so16]),
        weight_bw_gbs=bw, weight_only_tflops=quant_tf, source=f"measured by leanlm hw calibrate on {cpu or 'this CPU'}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}",
    )  # fmt: skip
    hw.token_overhead_us = statistics.mean([step(_prefill_token_overhead, hw, torch.float32),
                                            step(_prefill_token_overhead, hw, torch.bfloat16)])  # fmt: skip
    bar.close()
    return hw


def profile_or_calibrate(name: str, log=print) -> HardwareProfile:
    """load_profile(name); for 'cpu' on a machine not yet calibrated, calibrate it first (about a minute) and keep
    the profile, as the verbs that price with the cost model need one."""
    from .profiles import load_profile, profile_path, save_profile

    if name == "cpu" and not profile_path().exists():
        log("no calibrated profile of this CPU yet: measuring it (leanlm hw calibrate, about a minute)")
        save_profile(calibrate(progress=False))
    return load_profile(name)
