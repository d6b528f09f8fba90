"""2:4 sparse int8 (leanlm.quant.nm) against dense int8, one run: kernel and whole-model decode.

Kernel rows: ops.q_linear_nm vs ops.q_linear (dense int8 tiles) on the same 2:4 codes at a model's shapes
(Qwen2.5-0.5B: 896x896, 4864x896, 896x4864; out x in), 1 and 4 activation rows, both the AVX2 copies and (where
the CPU has it) the AVX512-VNNI ones, calls interleaved, median microseconds per call.
Model rows: the model pruned 2:4 (magnitude: the speed does not depend on the method), RTN int8 per channel
(symmetric) as dense QuantLinears, and the same codes as NMInt8Linears (leanlm.apply(model, NMInt8())):
batch-1 decode (fused step) interleaved round by round, tok/s by wall clock and process CPU ms per token (the
work done, which a busy machine's scheduler does not stretch), and whether 24 greedy tokens agree.

    LEANLM_DATA=../shared/data python benchmarks/bench_nm.py --archive                  # Qwen2.5-0.5B
    python benchmarks/bench_nm.py --model smollm2-135m --kernel-only --archive
Writes benchmarks/results/nm.json (an --archive run: benchmarks/results/archive/DATE/nm.json).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import add_result_args, machine, median, print_table, write_result

import leanlm
from leanlm import ops
from leanlm.evaluate.speed import fixed_prompt, weight_bytes
from leanlm.prune import Unstructured, prune_unstructured
from leanlm.quant import RTN, NMInt8, quantize
from leanlm.quant.nm import tile_nm
from leanlm.quant.packed import tile_codes

SHAPES = {"qwen2.5-0.5b": [(896, 896), (4864, 896), (896, 4864)],
          "smollm2-135m": [(576, 576), (1536, 576), (576, 1536)]}


def random_nm(N: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int16)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1).argsort(-1) < 2
    return (v.view(N, K // 4, 4) * keep).view(N, K).to(torch.int8)


def kernel_rows(shapes, reps: int, rounds: int) -> list[dict]:
    ext = ops.native.extension()
    copies = [False, True] if ops.native.cpu_flags() & {"avx512_vnni"} else [False]
    rows = []
    for N, K in shapes:
        v = random_nm(N, K)
        scales = (torch.rand(N, 1) * 0.01 + 1e-3).to(torch.bfloat16)
        wn, wd = tile_nm(v), tile_codes(v, 8, 0)
        for vnni in copies:
            b1, b2 = ops.set_q_linear_nm_vnni(vnni), ext.set_q_linear_vnni(vnni)
            try:
                for M in (1, 4):
                    x = torch.randn(M, K)
                    assert torch.equal(ops.q_linear_nm(x, wn, scales, K), ops.q_linear(x, wd, scales, None, 8, K))
                    t = {"nm": [], "dense": []}
                    c = {"nm": [], "dense": []}
                    for _ in range(rounds):  # interleaved, so machine noise hits both alike
                        for name, fn in (("dense", lambda: ops.q_linear(x, wd, scales, None, 8, K)),
                                         ("nm", lambda: ops.q_linear_nm(x, wn, scales, K))):  # fmt: skip
                            fn()
                            t0, c0 = time.perf_counter(), time.thread_time()
                            for _ in range(reps):
                                fn()
                            t[name].append((time.perf_counter() - t0) / reps * 1e6)
                            c[name].append((time.thread_time() - c0) / reps * 1e6)
                    d, n = median(t["dense"]), median(t["nm"])
                    dc, nc = median(c["dense"]), median(c["nm"])
                    rows.append({"shape": f"{N}x{K}", "rows": M, "copy": "vnni" if vnni else "avx2",
                                 "dense_int8_us": round(d, 2), "nm_2_4_us": round(n, 2), "speedup": round(d / n, 3),
                                 # this thread's CPU time: not counting the time the scheduler took it off the core
                                 "dense_int8_cpu_us": round(dc, 2), "nm_2_4_cpu_us": round(nc, 2),
                                 "speedup_cpu": round(dc / nc, 3),
                                 "dense_bytes": wd.numel(), "nm_bytes": wn.numel()})  # fmt: skip
            finally:
                ops.set_q_linear_nm_vnni(b1)
                ext.set_q_linear_vnni(b2)
    return rows


def decode_times(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(wall s, process CPU s) per token of `new_tokens` one-token forwards after a prefill of `prompt`, on the
    runtime's default (fused) decode step. CPU time counts every thread of the process while it ran on a core,
    so it shows the work done even when the scheduler of a busy machine stretches the wall time."""
    model.setup_cache(1, len(prompt) + new_tokens + 1)
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]), 0)[:, -1]
            nxt = int(logits.argmax())
            t0, c0 = time.perf_counter(), time.process_time()
            for p in range(len(prompt), len(prompt) + new_tokens):
                nxt = int(model(torch.tensor([[nxt]]), p)[:, -1].argmax())
            return (time.perf_counter() - t0) / new_tokens, (time.process_time() - c0) / new_tokens
    finally:
        model.clear_cache()


def model_rows(name: str, new_tokens: int, runs: int) -> dict:
    base, tok = leanlm.load(name, "float32")
    prune_unstructured(base, Unstructured("magnitude", pattern="2:4"), None, progress=False)
    quantize(base, RTN(bits=8, group=0, symmetric=True), progress=False)
    nm = copy.deepcopy(base)
    packed = leanlm.apply(nm, NMInt8())
    models = {"dense int8 (2:4 zeros stored)": base, "2:4 int8": nm}
    for m in models.values():
        m.prepare_decode()  # as `leanlm generate` decodes (weight layout, huge pages)
    vocab = base.config.vocab_size
    prompt = fixed_prompt(vocab, 16, seed=1)  # <= 16 rows: the prefill runs the small-row kernels too
    raw = {k: {"wall": [], "cpu": []} for k in models}
    for r in range(runs + 1):  # the first round warms up; models interleaved so machine noise hits both
        for k, m in models.items():
            w, c = decode_times(m, prompt, new_tokens)
            if r:
                raw[k]["wall"].append(w)
                raw[k]["cpu"].append(c)
    speed = {k: {"decode_tok_s": 1 / median(v["wall"]), "decode_tok_s_runs": [1 / x for x in v["wall"]],
                 "cpu_ms_per_token": median(v["cpu"]) * 1e3, "cpu_ms_per_token_runs": [x * 1e3 for x in v["cpu"]]}
             for k, v in raw.items()}  # fmt: skip
    from leanlm.decode.generate import generate_tokens

    greedy = [list(generate_tokens(m, prompt, 24, eos_ids=set())) for m in models.values()]
    d, n = speed["dense int8 (2:4 zeros stored)"], speed["2:4 int8"]
    return {"model": name, "block_linear_bytes": packed,
            "weight_bytes": {k: weight_bytes(m) for k, m in models.items()},
            "decode": speed, "speedup_wall": n["decode_tok_s"] / d["decode_tok_s"],
            "speedup_cpu": d["cpu_ms_per_token"] / n["cpu_ms_per_token"], "prompt_tokens": len(prompt),
            "greedy_24_tokens_equal": greedy[0] == greedy[1], "new_tokens": new_tokens, "runs": runs}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=2, help="threads of the decode rows")
    ap.add_argument("--kernel-threads", type=int, default=1,
                    help="threads of the kernel rows (1: on a busy machine a 2-thread call waits for a descheduled "
                         "thread, and the CPU-time columns count the one calling thread)")
    ap.add_argument("--kernel-only", action="store_true", help="skip the whole-model decode rows")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=50, help="kernel calls per timing")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timings per kernel row (median)")
    add_result_args(ap)
    args = ap.parse_args()
    out = {"machine": machine(), "threads": args.threads, "kernel_threads": args.kernel_threads, "isa": ops.isa()}
    torch.set_num_threads(args.kernel_threads)
    out["kernel"] = kernel_rows(SHAPES[args.model], args.reps, args.rounds)
    print_table(out["kernel"], ["shape", "rows", "copy", "dense_int8_us", "nm_2_4_us", "speedup", "dense_int8_cpu_us",
                                "nm_2_4_cpu_us", "speedup_cpu"])  # fmt: skip
    torch.set_num_threads(args.threads)
    if not args.kernel_only:
        out["decode"] = model_rows(args.model, args.new_tokens, args.runs)
        d = out["decode"]
        print({k: (round(v["decode_tok_s"], 2), round(v["cpu_ms_per_token"], 1)) for k, v in d["decode"].items()},
              "speedup wall", round(d["speedup_wall"], 3), "cpu", round(d["speedup_cpu"], 3),
              "greedy equal", d["greedy_24_tokens_equal"])  # fmt: skip
    write_result("nm", out, partial=args.kernel_only, archive=args.archive, machine_shared=True)


if __name__ == "__main__":
    main()
