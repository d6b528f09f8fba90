"""Same-run A/B: bf16 decode with small_linear's AVX512-BF16 dot path on vs off (widening to fp32).

    python benchmarks/bench_bf16_dot_ab.py qwen2.5-0.5b   # writes benchmarks/results/archive/DATE/bf16_dot_ab.json
"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import torch
from common import LeanlmEngine, interleaved_speed, machine, write_result
from leanlm import native
from leanlm.model import load

torch.set_num_threads(2)
ext = native.extension()


class Toggle(LeanlmEngine):
    def __init__(self, model, name, dot):
        super().__init__(model, name, prepare=False)
        self.dot = dot

    def _run(self, ids, n):
        before = ext.set_small_bf16(self.dot)
        try:
            return super()._run(ids, n)
        finally:
            ext.set_small_bf16(before)


out = {}
for name in sys.argv[1:]:
    model, tok = load(name, dtype=torch.bfloat16)
    model.prepare_decode()
    engines = [Toggle(model, "bf16-dot", True), Toggle(model, "bf16-widen", False)]
    short = list(range(100, 132))
    res = interleaved_speed(engines, short, short, 128, runs=5, warmup=1, phases=("decode",))
    out[name] = {k: v["decode_tok_s"] for k, v in res.items()}
    out[name]["dot_vs_widen"] = out[name]["bf16-dot"] / out[name]["bf16-widen"]
    print(name, out[name], flush=True)
write_result("bf16_dot_ab", {"models": out, "machine": machine()}, archive=True)
