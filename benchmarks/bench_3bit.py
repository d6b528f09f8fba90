"""The 3-bit table grids (3.5 bits per weight at g32) on Qwen2.5-0.5B: kernel speed, quality, quantize time.

Modes (--modes, default all three):

- kernels: one-row decode GEMV time of q_linear_codebook3 (3-bit table, g32: 3.5 bpw) and q_linear_codebook (4-bit
  IQ4_NL table, g32: 4.5 bpw) against q_linear (uniform int4 symmetric g32, 4.5 bpw), all three over tiles of 16
  rows, on the model's own layer shapes (N x K: wqkv 1152x896, wo 896x896, gate or up 4864x896, down 896x4864; the
  weights of layer --layer, quantized by RTN), a bf16 activation row as the decode step hands it. Per thread count
  (--threads) and ISA path (the AVX512-VNNI copy where the CPU has it, for the 4-bit table its VNNI + VBMI copy where
  the CPU also has VBMI, vbmi_cpu; and the AVX2 copy every kernel also has), the kernels run interleaved (k1, k2, k3, k1, ...; --repeats samples of --calls calls
  each): median and min-max microseconds per call. per_token_ms: 24 layers x (wqkv + wo + 2 x gate/up + down) from
  those medians, the decoder linears' share of one decode step (an estimate: the runtime's fused gate/up is one
  9728-row call, and each matrix is timed alone, from cache); per_token_ms_min the same from the fastest samples;
  ratio_cb3_vs / ratio_cb4_vs (/ _cb5 / _cb6): the table kernels' per-token time over each other kernel's. --kernels cb4-iq4nl-g128
  int4-g128-sym (with the default three) adds the 4-bit table and uniform int4 at g128 to the same interleaved run;
  cb5-signed-g32 cb6-signed-g32 the 5- and 6-bit signed integer tables (q_linear_wide, 5.5 / 6.5 bpw).
- quality: GPTQ (act-order, head_bits=8, int8 per-channel LM head) onto the 3-bit tables "iq3" and "learned" at
  g32, with RTN onto iq3 and GPTQ onto the 4-bit IQ4_NL table at g32 as references, calibrated on --samples
  windows of WikiText-2 validation; WikiText-2 test ppl, KL(fp32 || quantized) and top-1 agreement on --windows
  windows of --seq-len tokens, through the decode kernels' numerics (CodebookLinear.kernel_all_rows), against
  the float32 model; the quantize time (wall and CPU seconds; quantizing and scoring on --quality-threads threads)
  and bits per weight (the decoder Linears', and the whole model's storage over its parameter count). The
  reference log-probs are kept on disk, one window at a time in memory (the fp32 model and four 512-token windows
  of a 152k vocabulary would otherwise hold ~4 GB at once).
- tables: the relative squared RTN error (sum (w - w_hat)^2 / sum w^2, scales from the search) of the decoder
  Linears of every --table-layer-step-th layer on 8-level tables: the plain Lloyd-Max Laplacian levels, IQ3 (derived
  from them, codebook.IQ3) and a table learned per tensor, at g32 and g64: the evidence for codebook.IQ3's comment.

    LEANLM_DATA=/path/to/data python benchmarks/bench_3bit.py --archive
    python benchmarks/bench_3bit.py --modes kernels --threads 1 --archive

Writes quant_3bit.json (the canonical file for a full run, or results/archive/DATE/ with --archive or --modes).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_result_args, machine, print_table, window_scores, write_result

from leanlm import ops
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows
from leanlm.evaluate.speed import weight_bytes
from leanlm.model import load_model
from leanlm.model.load import load_tokenizer, resolve
from leanlm.quant import GPTQ, RTN, CodebookLinear, QSpec, QuantLinear, quantize, read_calibration, rtn
from leanlm.quant.codebook import IQ3, LLOYD_MAX_LAPLACE_8, learn_table, nearest_level, search_scales

NAME = "quant_3bit"
MODES = ("kernels", "quality", "tables")
# (label, HF weight names stacked into one matrix): the runtime's four linears of a block
SHAPES = {"wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "wo": ("self_attn.o_proj",),
          "gate": ("mlp.gate_proj",), "down": ("mlp.down_proj",)}  # fmt: skip
PER_LAYER_CALLS = {"wqkv": 1, "wo": 1, "gate": 2, "down": 1}  # gate and up share a shape
KERNELS = {"cb3-iq3-g32": QSpec(3, 32, True, "iq3"), "cb4-iq4nl-g32": QSpec(4, 32, True, "iq4nl"),
           "int4-g32-sym": QSpec(4, 32, True), "cb4-iq4nl-g128": QSpec(4, 128, True, "iq4nl"),
           "int4-g128-sym": QSpec(4, 128, True), "cb5-signed-g32": QSpec(5, 32, True, "signed"),
           "cb6-signed-g32": QSpec(6, 32, True, "signed")}  # fmt: skip
DEFAULT_KERNELS = ("cb3-iq3-g32", "cb4-iq4nl-g32", "int4-g32-sym")  # --kernels adds the g128 pair on request
ROWS = {
    "gptq-cb3-iq3-g32": GPTQ(bits=3, group=32, symmetric=True, levels="iq3", act_order=True, head_bits=8),
    "gptq-cb3-learned-g32": GPTQ(bits=3, group=32, symmetric=True, levels="learned", act_order=True, head_bits=8),
    "rtn-cb3-iq3-g32": RTN(bits=3, group=32, symmetric=True, levels="iq3", head_bits=8),
    "gptq-cb4-iq4nl-g32": GPTQ(bits=4, group=32, symmetric=True, levels="iq4nl", act_order=True, head_bits=8),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def weights_file(directory: Path):
    from safetensors import safe_open

    return safe_open(str(Path(directory) / "model.safetensors"), "pt")


def layer_weight(f, layer: int, parts: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([f.get_tensor(f"model.layers.{layer}.{p}.weight").float() for p in parts])


# ---- kernels ------------------------------------------------------------------------------------------------------
def kernel_call(m):
    """The module's one-row kernel as a no-argument call (what its forward runs, without the module around it)."""
    if isinstance(m, CodebookLinear) and m.spec.bits > 4:
        return lambda x: ops.q_linear_wide(x, m.qweight, m.scales, m.spec.bits, m.kgroup)
    if isinstance(m, CodebookLinear):
        product = ops.q_linear_codebook3 if m.spec.bits == 3 else ops.q_linear_codebook
        return lambda x: product(x, m.qweight, m.scales, m.table, m.kgroup)
    assert m.backend == "native", "uniform int4 needs the native q_linear"
    return lambda x: ops.q_linear(x, m.qweight, m.scales, m.zeros, 4, m.kgroup)


def set_vnni(allowed: bool) -> None:
    lib = ops._lib()
    lib.set_q_linear_codebook_vnni(allowed)
    lib.set_q_linear_wide_vnni(allowed)
    lib.set_q_linear_vnni(allowed)


def cpu_flag(name: str) -> bool | None:
    """Whether /proc/cpuinfo lists the CPU flag (None where there is no such file)."""
    try:
        return name in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None


def bench_kernels(args, directory) -> dict:
    f = weights_file(directory)
    vnni_cpu = bool(ops._lib().q_gemm_supported())  # AVX512F/BW/VL + VNNI: the kernels' VNNI copies run
    out = {"layer": args.layer, "calls_per_sample": args.calls, "samples": args.repeats, "activation": "bf16 [1, K]",
           "isa_build": ops.isa(), "vnni_cpu": vnni_cpu, "vbmi_cpu": vnni_cpu and cpu_flag("avx512vbmi"),
           "shapes": {}}  # fmt: skip
    for label, parts in SHAPES.items():
        w = layer_weight(f, args.layer, parts)
        specs = {k: KERNELS[k] for k in args.kernels}
        mods = {k: (CodebookLinear if s.codebook else QuantLinear)(rtn(w, s)) for k, s in specs.items()}
        x = torch.randn(1, w.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        calls = {k: kernel_call(m) for k, m in mods.items()}
        exact = x.float() @ w.t()
        shape = out["shapes"][label] = {"N": w.shape[0], "K": w.shape[1],
                                        "weight_bytes": {k: weight_bytes(m) for k, m in mods.items()},
                                        "rel_error_vs_fp32_product": {k: ((c(x) - exact).norm() / exact.norm()).item()
                                                                      for k, c in calls.items()}}  # fmt: skip
        for threads in args.threads:
            torch.set_num_threads(threads)
            for isa in ("vnni", "avx2") if vnni_cpu else ("avx2",):
                set_vnni(isa == "vnni")
                samples = {k: [] for k in calls}
                for r in range(args.repeats + 1):  # the first round warms up
                    for k, c in calls.items():
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            c(x)
                        if r:
                            samples[k].append((time.perf_counter() - t0) / args.calls * 1e6)
                shape[f"t{threads}-{isa}"] = {k: {"median_us": statistics.median(v), "min_us": min(v), "max_us": max(v)}
                                              for k, v in samples.items()}  # fmt: skip
                log(f"  {label} {w.shape[0]}x{w.shape[1]} threads {threads} {isa}: "
                    + ", ".join(f"{k} {statistics.median(v):.1f} us" for k, v in samples.items()))  # fmt: skip
        set_vnni(True)
    torch.set_num_threads(args.threads[0])
    runs = sorted({k for s in out["shapes"].values() for k in s if k.startswith("t")})
    def per_token(run: str, k: str, stat: str) -> float:
        return 24 * sum(n * out["shapes"][s][run][k][stat] for s, n in PER_LAYER_CALLS.items()) / 1e3

    out["per_token_ms"] = {run: {k: per_token(run, k, "median_us") for k in args.kernels} for run in runs}
    # from the fastest samples: on a machine shared with other jobs, the least disturbed figure
    out["per_token_ms_min"] = {run: {k: per_token(run, k, "min_us") for k in args.kernels} for run in runs}
    for stat in ("", "_min"):
        t = out[f"per_token_ms{stat}"]
        for name, key in (("cb3", "cb3-iq3-g32"), ("cb4", "cb4-iq4nl-g32"), ("cb4_g128", "cb4-iq4nl-g128"),
                          ("cb5", "cb5-signed-g32"), ("cb6", "cb6-signed-g32")):  # fmt: skip
            if key in args.kernels:
                out[f"ratio_{name}_vs{stat}"] = {run: {k: t[run][key] / t[run][k] for k in args.kernels if k != key}
                                                 for run in runs}  # fmt: skip
    return out


# ---- quality ------------------------------------------------------------------------------------------------------
class DiskRef:
    """QualityRef's measurement (benchmarks/common.py) with the base log-probs on disk, one window in memory."""

    def __init__(self, base, windows: list[torch.Tensor], folder: Path):
        self.windows, self.paths = windows, []
        nll = 0.0
        with torch.inference_mode():
            for i, w in enumerate(windows):
                lb = F.log_softmax(base(w)[0, :-1].float(), -1)
                nll -= lb.gather(-1, w[0, 1:, None]).sum().item()
                self.paths.append(folder / f"base_lp_{i}.pt")
                torch.save(lb, self.paths[-1])
                del lb
        self.nll_base = nll

    @torch.inference_mode()
    def __call__(self, model) -> dict:
        kl = agree = nll_c = 0.0
        count = 0
        for w, path in zip(self.windows, self.paths):
            lb, target = torch.load(path), w[0, 1:]
            k, a, n = window_scores(lb, F.log_softmax(model(w)[0, :-1].float(), -1), target)
            kl, agree, nll_c, count = kl + k, agree + a, nll_c + n, count + target.numel()
            del lb
        return {"ppl": math.exp(nll_c / count), "ppl_base": math.exp(self.nll_base / count), "kl": kl / count,
                "top1_agreement": agree / count, "tokens": count, "windows": len(self.windows)}  # fmt: skip


def bench_quality(args, directory, rows: dict, save) -> None:
    torch.set_num_threads(args.quality_threads)
    tok = load_tokenizer(directory)
    windows = make_windows(tok, wikitext2_test(), args.seq_len, args.windows)
    calib = read_calibration("wikitext2-valid", tok, args.samples, args.seq_len)
    with tempfile.TemporaryDirectory(prefix="leanlm-3bit-") as tmp:
        log(f"reference log-probs (float32) on {len(windows)} x {args.seq_len} tokens")
        base = load_model(directory, "float32")
        n_params = sum(p.numel() for p in base.parameters())
        ref = DiskRef(base, windows, Path(tmp))
        del base
        gc.collect()
        for name in args.rows:
            cfg = ROWS[name]
            log(f"{name}: quantizing ({cfg.method}, {cfg.spec.label()})")
            model = load_model(directory, "float32")
            t0, c0 = time.perf_counter(), time.process_time()
            quantize(model, cfg, calib, progress=False)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            gc.collect()
            rec = {"config": cfg.to_dict(), "quantize_s": round(seconds, 1), "quantize_cpu_s": round(cpu, 1),
                   "threads": args.quality_threads,
                   "bpw_decoder_linears": model.quantization["bits_per_weight"],
                   "bpw_model": weight_bytes(model) * 8 / n_params,
                   "weight_mb": weight_bytes(model) / 2**20}  # fmt: skip
            CodebookLinear.kernel_all_rows = True  # scored through the decode kernels' numerics
            try:
                rec["wikitext2"] = ref(model)
            finally:
                CodebookLinear.kernel_all_rows = False
            r = rec["wikitext2"]
            rec["ppl_delta_pct"] = 100 * (r["ppl"] / r["ppl_base"] - 1)
            rows[name] = rec
            log(f"  {name}: {rec['bpw_decoder_linears']:.3f} bpw (model {rec['bpw_model']:.3f}), quantize "
                f"{seconds:.0f} s, ppl {r['ppl']:.3f} (fp32 {r['ppl_base']:.3f}, {rec['ppl_delta_pct']:+.2f}%), "
                f"KL {r['kl']:.4f}, top-1 {r['top1_agreement']:.3f}")  # fmt: skip
            del model
            gc.collect()
            save()


# ---- tables -------------------------------------------------------------------------------------------------------
def bench_tables(args, directory) -> dict:
    f = weights_file(directory)
    half = [round(v * 127 / LLOYD_MAX_LAPLACE_8[-1]) for v in LLOYD_MAX_LAPLACE_8]
    fixed = {"lloyd-max-laplace": [-v for v in reversed(half)] + half, "iq3": list(IQ3)}
    layers = list(range(0, 24, args.table_layer_step))
    out = {"layers": layers, "tables": {**fixed, "learned": "per tensor (learn_table, bits=3)"}}
    for g in (32, 64):
        err = {k: 0.0 for k in (*fixed, "learned")}
        total = 0.0
        for layer in layers:
            for parts in SHAPES.values():
                for part in parts:
                    w = layer_weight(f, layer, (part,))
                    x = w.view(w.shape[0], -1, g)
                    total += x.square().sum().item()
                    tables = {**{k: torch.tensor(v, dtype=torch.float32) for k, v in fixed.items()},
                              "learned": learn_table(x, bits=3).float()}  # fmt: skip
                    for k, lv in tables.items():
                        d = search_scales(x, lv).to(torch.bfloat16).float()[..., None]
                        err[k] += (x - d * lv[nearest_level(x / d, lv)]).square().sum().item()
            log(f"  tables g{g}: layer {layer} done")
        out[f"g{g}"] = {k: v / total for k, v in err.items()}
        log(f"  tables g{g}: " + ", ".join(f"{k} {v / total:.5f}" for k, v in err.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="kernel timings per thread count")
    ap.add_argument("--kernels", nargs="+", default=list(DEFAULT_KERNELS), choices=list(KERNELS),
                    help="the kernels the kernels mode times (interleaved)")
    ap.add_argument("--layer", type=int, default=12, help="the layer whose weights the kernel timings use")
    ap.add_argument("--calls", type=int, default=200, help="kernel calls per timing sample")
    ap.add_argument("--repeats", type=int, default=9, help="timing samples per kernel (interleaved)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (WikiText-2 validation)")
    ap.add_argument("--quality-threads", type=int, default=2, help="threads of quantizing and scoring")
    ap.add_argument("--table-layer-step", type=int, default=4)
    add_result_args(ap)
    args = ap.parse_args()
    if not ops.available():
        raise SystemExit("bench_3bit needs leanlm's native kernels")
    torch.set_num_threads(args.threads[0])
    directory = resolve(args.model)
    partial = (set(args.modes) != set(MODES) or set(args.rows) != set(ROWS)
               or set(args.kernels) != set(DEFAULT_KERNELS))  # fmt: skip
    result = {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k not in ("archive",
                                                                                                  "machine_shared")},
              "machine": machine()}  # fmt: skip

    def save(final: bool = False) -> None:
        write_result(NAME, result, partial=partial, archive=args.archive, checkpoint=not final,
                     machine_shared=args.machine_shared)  # fmt: skip

    if "kernels" in args.modes:
        log("kernels")
        result["kernels"] = bench_kernels(args, directory)
        save()
    if "tables" in args.modes:
        log("tables")
        result["tables"] = bench_tables(args, directory)
        save()
    if "quality" in args.modes:
        result["quality"] = {}
        bench_quality(args, directory, result["quality"], save)
    save(final=True)
    if "kernels" in result:
        k = result["kernels"]
        print("\ndecoder linears per token (ms, one row, from the per-shape medians / fastest samples):")
        print_table([{"run": run, **{n: f"{v:.2f} / {k['per_token_ms_min'][run][n]:.2f}" for n, v in t.items()}}
                     for run, t in k["per_token_ms"].items()], ["run", *args.kernels])  # fmt: skip
    if "quality" in result:
        print("\nWikiText-2 vs float32:")
        print_table([{"row": n, "bpw": r["bpw_decoder_linears"], "bpw_model": r["bpw_model"],
                      "ppl": r["wikitext2"]["ppl"], "ppl_delta_pct": r["ppl_delta_pct"], "kl": r["wikitext2"]["kl"],
                      "top1": r["wikitext2"]["top1_agreement"], "quantize_s": r["quantize_s"]}
                     for n, r in result["quality"].items()],
                    ["row", "bpw", "bpw_model", "ppl", "ppl_delta_pct", "kl", "top1", "quantize_s"])  # fmt: skip


if __name__ == "__main__":
    main()
