"""leanlm against llama.cpp and OpenVINO GenAI on real-size models, idle and with one core busy, against the
DRAM-read bound.

Per model (`--models`, default smollm2-135m and qwen2.5-0.5b; gemma3-270m and qwen2.5-1.5b may be added, which
adds about 5 and 25 minutes on 2 cores), from the HF directory
leanlm loads (leanlm.model.load.resolve):
- GGUFs made by llama.cpp's own tools from the same weights: F16 (convert_hf_to_gguf.py --outtype f16), then
  Q8_0, Q4_0 and Q4_K_M (llama-quantize from that F16); cached under $LEANLM_CACHE/peers-gguf/ keyed on the
  directory's fingerprint. Needs `bash benchmarks/setup_peers.sh --tools`.
- Engines, interleaved run by run in this one process on the same token ids: leanlm bf16, int8 (RTN per channel)
  and int4 (RTN group 128) from the fp32 weights; llama.cpp (llama-cpp-python) on each GGUF; OpenVINO GenAI on
  each GGUF it can read (what it cannot is recorded under "skipped").
- Idle mode: prefill at --prompt-len tokens and decode of --new-tokens after a 32-token prompt, median of --runs
  runs after --warmup. Busy mode: the same decode while a separate process spins on one core (--busy-cpu, pinned;
  killed at the end whatever happens), for leanlm's paths and llama.cpp F16 / Q8_0 / Q4_0 (every engine with
  --busy-all; prefill too with --busy-prefill).
- The DRAM-read bandwidth (best torch.sum over a --bandwidth-gb fp32 tensor at --threads; where an engine streams
  its weights faster than that probe reads, that engine's read rate), and per engine the
  DRAM-read bound of decode: bandwidth / weight bytes a decoded token reads (every decoder-layer weight and the
  LM head, each tensor once; the embedding row lookup is left out), and the engine's share of it.

    bash benchmarks/setup_peers.sh --tools                   # once: llama.cpp's tools (~10+ min on 2 cores)
    LEANLM_DATA=../shared/data python benchmarks/bench_peers.py                  # canonical: the two default models
    python benchmarks/bench_peers.py --models smollm2-135m --modes idle          # partial: to the archive
    python benchmarks/bench_peers.py --quick                                     # smoke test (archive)

Writes benchmarks/results/peers.json with a per-model `summary`; a run with fewer models, modes, engines or GGUF
types, other lengths, or --quick is partial and goes to benchmarks/results/archive/.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import os
import signal
import sys
import time

import torch
from common import (BusyCore, LeanlmEngine, LlamaCppEngine, OpenVINOEngine, add_result_args, dram_read_bandwidth,
                    interleaved_speed, leanlm_quant_configs, machine, print_table, write_result)  # fmt: skip
from llamacpp_tools import GGUF_TYPES, LLAMA_CPP_PYTHON_VERSION, build_ggufs, gguf_bytes_per_token, gguf_tensors

from leanlm import LeanlmError
from leanlm.evaluate.speed import fixed_prompt
from leanlm.model.load import load_model, resolve

MODELS = ("smollm2-135m", "qwen2.5-0.5b")  # the canonical table: the L3-sized model and the real-size one
EXTRA_MODELS = ("gemma3-270m", "qwen2.5-1.5b")  # may be added with --models (the run stays canonical)
MODES = ("idle", "busy")
LEANLM_BITS = {"bf16": 16, "int8": 8, "int4": 4}
# the llama.cpp type each leanlm path is compared with at decode (same weight bits, same block structure class)
DECODE_PAIRS = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
QUICK = {"runs": 1, "warmup": 0, "prompt_len": 64, "new_tokens": 16, "bandwidth_gb": 0.5}
DEFAULTS = {"runs": 3, "warmup": 1, "prompt_len": 512, "new_tokens": 128, "bandwidth_gb": 1.5}


def log(msg: str) -> None:
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma-separated names (default: {','.join(MODELS)}; "
                    f"may add {', '.join(EXTRA_MODELS)}; --quick: smollm2-135m)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=None, help=f"timed runs per engine (default {DEFAULTS['runs']})")
    ap.add_argument("--warmup", type=int, default=None, help=f"untimed runs first (default {DEFAULTS['warmup']})")
    ap.add_argument("--prompt-len", type=int, default=None, help=f"prefill tokens (default {DEFAULTS['prompt_len']})")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help=f"decoded tokens (default {DEFAULTS['new_tokens']})")  # fmt: skip
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of idle,busy")
    ap.add_argument("--busy-cpu", type=int, default=None, help="the core the busy process is pinned to "
                    "(default: the last CPU)")  # fmt: skip
    ap.add_argument("--busy-prefill", action="store_true", help="in busy mode, time prefill as well as decode")
    ap.add_argument("--busy-all", action="store_true", help="in busy mode, time every engine (default: leanlm's "
                    "paths and llama.cpp F16, Q8_0, Q4_0)")  # fmt: skip
    ap.add_argument("--gguf-types", default=",".join(GGUF_TYPES), help="comma-separated subset of "
                    + ",".join(GGUF_TYPES))  # fmt: skip
    ap.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out of the timed engines")
    ap.add_argument("--no-openvino", action="store_true", help="leave OpenVINO GenAI out of the timed engines")
    ap.add_argument("--bandwidth-gb", type=float, default=None,
                    help=f"size of the bandwidth probe tensor (default {DEFAULTS['bandwidth_gb']})")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                    + " unless given; smollm2-135m unless --models")  # fmt: skip
    add_result_args(ap)
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k in DEFAULTS:
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    args.models = [m for m in (args.models or ("smollm2-135m" if args.quick else ",".join(MODELS))).split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.gguf_types = [t for t in args.gguf_types.split(",") if t]
    for what, got, known in (("mode", args.modes, MODES), ("GGUF type", args.gguf_types, GGUF_TYPES)):
        bad = [x for x in got if x not in known]
        if bad or not got:
            ap.error(f"unknown or empty {what} list {got}; known: {', '.join(known)}")
    if args.busy_cpu is None:
        args.busy_cpu = (os.cpu_count() or 1) - 1
    if args.runs < 1 or args.threads < 1:
        ap.error("--runs and --threads must be at least 1")
    return args


def is_partial(args, skipped: dict) -> bool:
    """Canonical only when every default row was measured: the default models (others may be added), both modes, all GGUF types and peers, the
    default lengths, and nothing skipped for a missing package."""
    return (args.quick or not set(MODELS) <= set(args.models) or list(args.modes) != list(MODES)
            or list(args.gguf_types) != list(GGUF_TYPES) or args.no_llamacpp or args.no_openvino
            or args.prompt_len != DEFAULTS["prompt_len"] or args.new_tokens != DEFAULTS["new_tokens"]
            or any(k in skipped for k in ("llama.cpp", "openvino")))  # fmt: skip


# ---- bytes per token --------------------------------------------------------------------------------------
def leanlm_bytes_per_token(model) -> int:
    """Weight bytes a decoded token reads in leanlm: every parameter and buffer of the decoder layers and of the
    LM head (the tied embedding table when there is no separate head), each storage counted once; KV caches,
    rotary tables and the embedding lookup are left out."""
    seen, total = set(), 0
    head = model.lm_head
    if head is None:
        head_tensors = [("tok_embeddings.weight", model.tok_embeddings.weight)]
    else:
        head_tensors = itertools.chain(head.named_parameters(), head.named_buffers())
    tensors = itertools.chain(model.layers.named_parameters(), model.layers.named_buffers(), head_tensors)
    for name, t in tensors:
        if "cache" in name.split("."):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ---- engines --------------------------------------------------------------------------------------------
def leanlm_models(directory: str):
    """{path: model}: bf16, and int8 / int4 RTN quantized from fp32 weights loaded fresh for each (never two fp32
    copies at once)."""
    from leanlm.quant import quantize

    out = {"bf16": load_model(directory, "bfloat16")}
    for label, cfg in leanlm_quant_configs().items():
        m32 = load_model(directory, "float32")
        out[label.removeprefix("leanlm-")] = quantize(m32, cfg, progress=False)
        del m32
        gc.collect()
    return out


def peer_engines(args, ggufs: dict, skipped: dict) -> dict:
    """{engine name: (engine, record)} for llama.cpp and OpenVINO on each GGUF; what cannot run goes to skipped."""
    out = {}
    n_ctx = max(1024, args.prompt_len + args.new_tokens + 64)
    peers = []
    if not args.no_llamacpp and "llama.cpp" not in skipped:
        peers.append(("llama.cpp", lambda p, n: LlamaCppEngine(str(p), n, args.threads, n_ctx=n_ctx)))
    if not args.no_openvino and "openvino" not in skipped:
        peers.append(("openvino", lambda p, n: OpenVINOEngine(str(p), n, args.threads)))
    for t, (path, info) in ggufs.items():
        for family, make in peers:
            name = f"{family}-{t}"
            try:
                engine = make(path, name)
            except Exception as e:  # a reader that does not support this architecture or type
                msg = " ".join(f"{type(e).__name__}: {e}".split())  # one line: it is quoted in a table note
                skipped[name] = msg if len(msg) <= 400 else f"{msg[:200]} ... {msg[-200:]}"
                log(f"  {name}: cannot run ({type(e).__name__}: ...{str(e)[-160:]})")
                continue
            out[name] = (engine, {"family": family, "type": t, "bits": GGUF_TYPES[t], "gguf": str(path),
                                  "bytes_per_token": info["bytes_per_token"], "bytes_source": "gguf tensors"})
    return out


def busy_engine(rec: dict, busy_all: bool) -> bool:
    """Timed in busy mode: leanlm's paths and llama.cpp on the types paired with them (what the summary compares),
    or every engine with --busy-all. A busy core slows decode several-fold, so this keeps the run's length sane."""
    paired = rec["family"] == "llama.cpp" and rec["type"] in DECODE_PAIRS.values()
    return busy_all or rec["family"] == "leanlm" or paired


# ---- the summary -----------------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or not b else a / b


def _speed(engines: dict, name: str, mode: str, key: str):
    return ((engines.get(name) or {}).get(mode) or {}).get(key)


def summarize_model(engines: dict) -> dict:
    """The per-model summary from {engine name: record with "family", "bits", "idle"/"busy" speeds and
    "share_of_dram_bound"}; a figure whose engines were not measured is None."""
    prefill, best = {}, {}
    for label, bits in LEANLM_BITS.items():
        peers = {n: _speed(engines, n, "idle", "prefill_tok_s") for n, e in engines.items()
                 if e["family"] != "leanlm" and e["bits"] == bits}  # fmt: skip
        peers = {n: v for n, v in peers.items() if v}
        if peers:
            best[label] = max(peers, key=peers.get)
            prefill[label] = _ratio(_speed(engines, f"leanlm-{label}", "idle", "prefill_tok_s"), peers[best[label]])
    known = [v for v in prefill.values() if v is not None]
    busy = {n: _ratio(_speed(engines, n, "busy", "decode_tok_s"), _speed(engines, n, "idle", "decode_tok_s"))
            for n, e in engines.items() if e["family"] in ("leanlm", "llama.cpp")}  # fmt: skip
    out = {
        "prefill_vs_best_peer": {**prefill, "min": min(known) if len(known) == len(LEANLM_BITS) else None,
                                 "best_peer": best},
        "busy_core_share_of_idle": {n: v for n, v in busy.items() if v is not None},
    }
    for label, t in DECODE_PAIRS.items():
        out[f"decode_{label}_vs_llamacpp_{t}"] = _ratio(_speed(engines, f"leanlm-{label}", "idle", "decode_tok_s"),
                                                        _speed(engines, f"llama.cpp-{t}", "idle", "decode_tok_s"))
    for label in ("int8", "int4"):
        out[f"{label}_share_of_dram_bound"] = (engines.get(f"leanlm-{label}") or {}).get("share_of_dram_bound")
    return out


# ---- one model ------------------------------------------------------------------------------------------
def bench_model(args, name: str, directory, bandwidth_b_s: float, skipped: dict) -> dict:
    rec = {"directory": str(directory), "gguf": {}, "engines": {}, "skipped": {}}
    ggufs = {}
    if not (args.no_llamacpp and args.no_openvino):
        log(f"{name}: GGUFs {', '.join(args.gguf_types)} (llama.cpp's converter and quantizer; cached)")
        paths = build_ggufs(directory, name, args.gguf_types, args.threads, log=log)
        for t, path in paths.items():
            tensors = gguf_tensors(path)
            info = {"path": str(path), "size_mb": path.stat().st_size / 2**20,
                    "bytes_per_token": gguf_bytes_per_token(tensors),
                    "tensor_types": sorted({v["type"] for v in tensors.values()})}  # fmt: skip
            rec["gguf"][t] = info
            ggufs[t] = (path, info)
        rec["fingerprint"] = paths[args.gguf_types[0]].parent.name.rsplit("-", 1)[-1]

    log(f"{name}: leanlm bf16, int8 RTN per channel, int4 RTN g128")
    models = leanlm_models(str(directory))
    engines = {}
    for label, m in models.items():
        engines[f"leanlm-{label}"] = (LeanlmEngine(m, f"leanlm-{label}"),
                                      {"family": "leanlm", "type": label, "bits": LEANLM_BITS[label],
                                       "bytes_per_token": leanlm_bytes_per_token(m), "bytes_source": "model storage"})
    engines.update(peer_engines(args, ggufs, rec["skipped"]))
    vocab = models["bf16"].config.vocab_size
    prompt, short = fixed_prompt(vocab, args.prompt_len), fixed_prompt(vocab, 32, seed=1)
    order = [e for e, _ in engines.values()]
    log(f"{name}: {len(order)} engines: {', '.join(engines)}")
    if "idle" in args.modes:
        log(f"{name}: idle, prefill@{args.prompt_len} + decode@{args.new_tokens}, {args.runs} runs")
        idle = interleaved_speed(order, prompt, short, args.new_tokens, args.runs, args.warmup,
                                 desc=f"{name} idle")  # fmt: skip
        for n, s in idle.items():
            engines[n][1]["idle"] = s
    if "busy" in args.modes:
        phases = ("prefill", "decode") if args.busy_prefill else ("decode",)
        busy_order = [e for n, (e, r) in engines.items() if busy_engine(r, args.busy_all)]
        # the idle runs just warmed every engine; a busy-only run warms up as usual
        warmup = 0 if "idle" in args.modes else args.warmup
        log(f"{name}: busy core (cpu {args.busy_cpu} spun by another process), {'+'.join(phases)}, "
            f"{', '.join(e.name for e in busy_order)}")
        with BusyCore(args.busy_cpu) as spinner:
            busy = interleaved_speed(busy_order, prompt, short, args.new_tokens, args.runs, warmup, phases=phases,
                                     desc=f"{name} busy")  # fmt: skip
        rec["busy_core"] = spinner.report()
        for n, s in busy.items():
            engines[n][1]["busy"] = s
    # the probe (torch.sum) can read slower than the fastest engine streams its weights; the bound is then the
    # fastest read rate any engine reached in this run, so no share exceeds 1
    for _, r in engines.values():
        decode = (r.get("idle") or {}).get("decode_tok_s")
        r["read_gb_s"] = None if decode is None else decode * r["bytes_per_token"] / 1e9
    fastest = max((r["read_gb_s"] for _, r in engines.values() if r["read_gb_s"] is not None), default=0.0)
    bound_b_s = max(bandwidth_b_s, fastest * 1e9)
    rec["bound_bandwidth_gb_s"] = bound_b_s / 1e9
    rec["bound_bandwidth_source"] = "probe" if bound_b_s == bandwidth_b_s else "fastest engine's read rate"
    for n, (_, r) in engines.items():
        r["dram_bound_tok_s"] = bound_b_s / r["bytes_per_token"]
        decode = (r.get("idle") or {}).get("decode_tok_s")
        r["share_of_dram_bound"] = None if decode is None else decode / r["dram_bound_tok_s"]
        rec["engines"][n] = r
    rec["summary"] = summarize_model(rec["engines"])
    engines.clear()
    models.clear()
    gc.collect()
    return rec


def print_model(name: str, rec: dict) -> None:
    rows = []
    for n, r in rec["engines"].items():
        idle, busy = r.get("idle") or {}, r.get("busy") or {}
        rows.append({"model": name, "engine": n, "bits": r["bits"], "prefill tok/s": idle.get("prefill_tok_s"),
                     "decode idle": idle.get("decode_tok_s"), "decode busy": busy.get("decode_tok_s"),
                     "MB/token": r["bytes_per_token"] / 1e6, "bound tok/s": r["dram_bound_tok_s"],
                     "share of bound": r["share_of_dram_bound"]})  # fmt: skip
    print_table(rows, list(rows[0]))
    for k, v in rec["summary"].items():
        print(f"  {k}: {v}")


def main(argv=None) -> None:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the busy-core process is killed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    skipped = {}
    peers = (("llama_cpp", "llama.cpp", args.no_llamacpp), ("openvino_genai", "openvino", args.no_openvino))
    for pkg, peer, off in peers:
        if not off and importlib.util.find_spec(pkg) is None:
            skipped[peer] = f"{pkg} not installed (bash benchmarks/setup_peers.sh)"
    directories = {}
    for name in args.models:  # every model resolves before anything long starts
        directories[name] = resolve(name)
    log(f"models: {', '.join(f'{n} ({d})' for n, d in directories.items())}")
    log(f"DRAM read bandwidth: torch.sum over {args.bandwidth_gb} GB at {args.threads} threads")
    bw = dram_read_bandwidth(args.bandwidth_gb)
    log(f"  {bw['dram_read_gb_s']:.1f} GB/s")
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    result = {"machine": machine(), "settings": vars(args), "bandwidth": bw, "skipped": skipped,
              "versions": {"llama_cpp_python": llama_version, "llama_cpp_tools": LLAMA_CPP_PYTHON_VERSION},
              "bytes_per_token": "weight bytes a decoded token reads: decoder-layer weights and the LM head (the tied "
              "embedding table when the head is tied), each tensor once; leanlm from its model's storage, llama.cpp "
              "and OpenVINO from the GGUF's tensors (OpenVINO may repack them)",
              "dram_bound": "bound bandwidth / bytes_per_token, where the bound bandwidth is the larger of the probe and the "
              "fastest weight-read rate (idle decode tok/s x bytes_per_token) any engine reached on that model; "
              "share_of_dram_bound = idle decode tok/s / that bound",
              "models": {}, "summary": {}}  # fmt: skip
    partial = is_partial(args, skipped)
    for i, (name, directory) in enumerate(directories.items()):
        rec = bench_model(args, name, directory, bw["dram_read_gb_s"] * 1e9, skipped)
        result["models"][name] = rec
        result["summary"][name] = rec["summary"]
        print_model(name, rec)
        last = i == len(directories) - 1
        write_result("peers", result, partial=partial, archive=args.archive, checkpoint=not last,
                     machine_shared=args.machine_shared)  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except LeanlmError as e:
        sys.exit(f"bench_peers: {e}")
