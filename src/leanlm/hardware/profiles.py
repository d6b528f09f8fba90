"""Hardware profiles for the cost model: bandwidth, peak throughput per dtype, overheads, price.

Datacenter figures are vendor datasheet numbers (dense unless noted); `bw_efficiency` and
`compute_efficiency` are the fractions a well-tuned kernel typically reaches. The CPU profile
of this machine is not guessed: `leanlm hw calibrate` measures it and saves it as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LeanlmError


@dataclass
class HardwareProfile:
    name: str
    mem_bw_gbs: float  # main-memory bandwidth (HBM / DRAM / on-chip SRAM for dataflow chips)
    peak_tflops: dict[str, float]  # dtype -> dense TFLOP/s (TOP/s for int)
    mem_gb: float
    bw_efficiency: float = 0.8
    compute_efficiency: float = 0.7
    # fixed cost per decoder layer per forward (kernel launches / op dispatch); decisive on
    # CPUs running eager PyTorch at batch 1, negligible for graphs on GPUs
    layer_overhead_us: float = 0.0
    step_overhead_us: float = 0.0  # per forward pass (embedding, LM head launch, sampling)
    token_overhead_us: float = 0.0  # per layer per extra row of a multi-token forward (prefill elementwise work)
    nm_sparse_speedup: float = 1.0  # 2:4 structured sparsity on matmuls (sparse tensor cores: 2x peak)
    unstructured_sparse_min: float = 1.0  # sparsity above which unstructured sparse kernels pay off
    weight_bw_gbs: dict[str, float] = field(default_factory=dict)  # measured GEMV bytes/s per weight dtype
    weight_only_tflops: dict[str, float] = field(default_factory=dict)  # measured multi-row products, quantized weights
    price_per_hour: float = 0.0  # USD, on-demand cloud list price
    power_w: float = 0.0
    source: str = ""

    def bandwidth(self, weight_dtype: str) -> float:
        """Effective bytes/s for streaming weights of this dtype (measured if known)."""
        if weight_dtype in self.weight_bw_gbs:
            return self.weight_bw_gbs[weight_dtype] * 1e9
        return self.mem_bw_gbs * 1e9 * self.bw_efficiency

    def flops(self, dtype: str) -> float:
        peak = self.peak_tflops.get(dtype) or self.peak_tflops.get("fp32", 1.0)
        return peak * 1e12 * self.compute_efficiency


BUILTIN = {
    "a100": HardwareProfile(
        "a100", mem_bw_gbs=2039, mem_gb=80, peak_tflops={"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312,
        "int8": 624, "int4": 1248}, layer_overhead_us=15, step_overhead_us=50, nm_sparse_speedup=2.0,
        unstructured_sparse_min=0.9, price_per_hour=1.8, power_w=400,
        source="NVIDIA A100 80GB SXM datasheet (2039 GB/s HBM2e; 312 TFLOPS bf16 dense, 2x with 2:4 sparsity)"),
    "h100": HardwareProfile(
        "h100", mem_bw_gbs=3350, mem_gb=80, peak_tflops={"fp32": 67, "tf32": 495, "bf16": 989, "fp16": 989,
        "fp8": 1979, "int8": 1979}, layer_overhead_us=12, step_overhead_us=40, nm_sparse_speedup=2.0,
        unstructured_sparse_min=0.9, price_per_hour=2.5, power_w=700,
        source="NVIDIA H100 SXM5 datasheet (3.35 TB/s HBM3; 989 TFLOPS bf16 dense, 1979 fp8/int8 dense)"),
    "h200": HardwareProfile(
        "h200", mem_bw_gbs=4800, mem_gb=141, peak_tflops={"fp32": 67, "tf32": 495, "bf16": 989, "fp16": 989,
        "fp8": 1979, "int8": 1979}, layer_overhead_us=12, step_overhead_us=40, nm_sparse_speedup=2.0,
        unstructured_sparse_min=0.9, price_per_hour=3.5, power_w=700,
        source="NVIDIA H200 SXM datasheet (4.8 TB/s HBM3e, 141 GB; H100 compute)"),
    "groq-lpu": HardwareProfile(
        "groq-lpu", mem_bw_gbs=80_000, mem_gb=0.23, peak_tflops={"fp16": 188, "bf16": 188, "int8": 750, "fp32": 188},
        bw_efficiency=0.6, compute_efficiency=0.5, layer_overhead_us=0.5, step_overhead_us=5,
        price_per_hour=0.0, power_w=300,
        source="Groq LPU (GroqChip) public figures: 230 MB on-die SRAM at 80 TB/s, 188 TFLOPS fp16, 750 TOPS int8; "
               "weights must fit the SRAM of the chips used (models are spread across many chips)"),
}


def profile_path() -> Path:
    from ..model.load import cache_root

    return cache_root() / "hardware" / "cpu.json"


def load_profile(name: str) -> HardwareProfile:
    """A built-in name, 'cpu' (this machine, from `leanlm hw calibrate`), or a JSON file."""
    if name in BUILTIN:
        return BUILTIN[name]
    path = profile_path() if name == "cpu" else Path(name)
    if not path.exists():
        if name == "cpu":
            raise LeanlmError("no calibrated CPU profile yet: run `leanlm hw calibrate` first (about a minute)")
        raise LeanlmError(f"unknown hardware '{name}': use one of {', '.join(BUILTIN)}, cpu, or a profile JSON file")
    return HardwareProfile(**json.loads(path.read_text()))


def save_profile(p: HardwareProfile, path: Path | None = None) -> Path:
    from ..io import write_json_atomic

    return write_json_atomic(path or profile_path(), asdict(p), force=True)
