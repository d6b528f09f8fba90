"""benchmarks/bench_peers.py and benchmarks/llamacpp_tools.py: the summary arithmetic, bytes per token, the busy
core, the llama.cpp tool lookup and the generated `peers` table (on synthetic results; the timed run itself is
the benchmark's)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_peers  # noqa: E402  (benchmarks/bench_peers.py)
import common  # noqa: E402
import llamacpp_tools  # noqa: E402
import tables  # noqa: E402

from leanlm import LeanlmError  # noqa: E402


def engine(family, bits, prefill, decode, busy=None, share=None):
    rec = {"family": family, "bits": bits, "bytes_per_token": 1e6, "dram_bound_tok_s": 100.0,
           "idle": {"prefill_tok_s": prefill, "decode_tok_s": decode}, "share_of_dram_bound": share}  # fmt: skip
    if busy is not None:
        rec["busy"] = {"decode_tok_s": busy}
    return rec


def synthetic_engines() -> dict:
    return {
        "leanlm-bf16": engine("leanlm", 16, 800.0, 50.0, busy=25.0, share=0.5),
        "leanlm-int8": engine("leanlm", 8, 750.0, 80.0, busy=20.0, share=0.8),
        "leanlm-int4": engine("leanlm", 4, 700.0, 120.0, busy=60.0, share=0.9),
        "llama.cpp-f16": engine("llama.cpp", 16, 500.0, 40.0, busy=10.0),
        "llama.cpp-q8_0": engine("llama.cpp", 8, 450.0, 64.0, busy=16.0),
        "llama.cpp-q4_0": engine("llama.cpp", 4, 400.0, 100.0, busy=50.0),
        "llama.cpp-q4_k_m": engine("llama.cpp", 4, 350.0, 90.0, busy=45.0),
        "openvino-q8_0": engine("openvino", 8, 1500.0, 70.0, busy=30.0),
        "openvino-q4_0": engine("openvino", 4, 1400.0, 80.0),
    }


def test_summary_ratios_against_the_best_peer_of_the_same_bits_and_llamacpp_of_the_same_type():
    s = bench_peers.summarize_model(synthetic_engines())
    pv = s["prefill_vs_best_peer"]
    assert pv["bf16"] == pytest.approx(800 / 500) and pv["best_peer"]["bf16"] == "llama.cpp-f16"
    assert pv["int8"] == pytest.approx(750 / 1500) and pv["best_peer"]["int8"] == "openvino-q8_0"
    assert pv["int4"] == pytest.approx(700 / 1400) and pv["best_peer"]["int4"] == "openvino-q4_0"
    assert pv["min"] == pytest.approx(0.5)
    assert s["decode_bf16_vs_llamacpp_f16"] == pytest.approx(50 / 40)
    assert s["decode_int8_vs_llamacpp_q8_0"] == pytest.approx(80 / 64)
    assert s["decode_int4_vs_llamacpp_q4_0"] == pytest.approx(120 / 100)
    assert s["int8_share_of_dram_bound"] == 0.8 and s["int4_share_of_dram_bound"] == 0.9
    busy = s["busy_core_share_of_idle"]
    assert busy["leanlm-int8"] == pytest.approx(0.25) and busy["llama.cpp-q4_0"] == pytest.approx(0.5)
    assert "openvino-q8_0" not in busy  # leanlm's paths and llama.cpp's only


def test_summary_leaves_unmeasured_figures_none():
    e = synthetic_engines()
    for n in ("llama.cpp-f16", "openvino-q4_0", "llama.cpp-q4_0", "llama.cpp-q4_k_m", "openvino-q8_0"):
        del e[n]
    del e["leanlm-int8"]["busy"]
    s = bench_peers.summarize_model(e)
    assert "bf16" not in s["prefill_vs_best_peer"] and s["prefill_vs_best_peer"]["min"] is None
    assert s["prefill_vs_best_peer"]["int8"] == pytest.approx(750 / 450)
    assert s["decode_bf16_vs_llamacpp_f16"] is None and s["decode_int4_vs_llamacpp_q4_0"] is None
    assert "leanlm-int8" not in s["busy_core_share_of_idle"]


def synthetic_result() -> dict:
    engines = synthetic_engines()
    return {"settings": {"prompt_len": 512, "new_tokens": 128, "runs": 3, "busy_cpu": 1},
            "bandwidth": {"dram_read_gb_s": 23.4, "threads": 2, "tensor_gb": 1.5}, "bytes_per_token": "weights",
            "models": {"tiny": {"engines": engines, "skipped": {"openvino-f16": "RuntimeError: no"},
                                "busy_core": {"spinner_core_share": 0.97}}},
            "summary": {"tiny": bench_peers.summarize_model(engines)}}  # fmt: skip


def test_peers_table_renders_one_row_per_model_and_engine_and_the_summary(tmp_path, monkeypatch):
    common.write_result("peers", synthetic_result(), root=tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    out = tables.render("peers")
    rows = [line for line in out.splitlines() if line.startswith("| tiny | ")]
    assert len(rows) == len(synthetic_engines()) + 1  # engines + the summary row
    assert "| tiny | leanlm-int8 | 8 | 750 | 80.0 | 20.0 (25%) | 1.0 | 100.0 | 80% |" in out
    assert "| tiny | openvino-q4_0 | 4 | 1,400 | 80.0 | - | 1.0 | 100.0 | - |" in out
    assert "| tiny | 1.60x | 0.50x | 0.50x | 1.25x | 1.25x | 1.20x | 25% | 25% | 80% | 90% |" in out
    assert "23.4 GB/s at 2 threads" in out and "tiny: openvino-f16 (RuntimeError: no)" in out
    assert "The busy process held 97% of a core (tiny)." in out
    assert "Source: [benchmarks/results/peers.json]" in out


def test_peers_table_without_engines_is_an_error(tmp_path, monkeypatch):
    d = synthetic_result()
    d["models"] = {}
    common.write_result("peers", d, root=tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    with pytest.raises(tables.TableError, match="no engines"):
        tables.render("peers")


# ---- bytes per token --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "llama_untied"])
def test_leanlm_bytes_per_token_counts_layers_and_head_once(tiny_dirs, arch):
    from transformers import AutoModelForCausalLM

    from leanlm.model.load import load_model

    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    n = {k: v.numel() for k, v in hf.state_dict().items()}
    layers = sum(v for k, v in n.items() if k.startswith("model.layers."))
    head = n["model.embed_tokens.weight"] if hf.config.tie_word_embeddings else n["lm_head.weight"]
    m = load_model(tiny_dirs[arch], "bfloat16")
    assert bench_peers.leanlm_bytes_per_token(m) == 2 * (layers + head)
    m.setup_cache(1, 64)  # a KV cache is not weight
    assert bench_peers.leanlm_bytes_per_token(m) == 2 * (layers + head)


def test_leanlm_bytes_per_token_shrinks_with_the_weight_bits(tiny_dirs):
    from leanlm.model.load import load_model
    from leanlm.quant import quantize

    sizes = {"bf16": bench_peers.leanlm_bytes_per_token(load_model(tiny_dirs["llama"], "bfloat16"))}
    for label, cfg in common.leanlm_quant_configs().items():
        m = quantize(load_model(tiny_dirs["llama"], "float32"), cfg, progress=False)
        sizes[label] = bench_peers.leanlm_bytes_per_token(m)
    assert sizes["leanlm-int4"] < sizes["leanlm-int8"] < sizes["bf16"]


def test_gguf_bytes_per_token_reads_the_tied_embedding_as_the_head():
    untied = {"token_embd.weight": {"bytes": 1000}, "blk.0.attn_q.weight": {"bytes": 10},
              "output.weight": {"bytes": 500}, "output_norm.weight": {"bytes": 1}}  # fmt: skip
    assert llamacpp_tools.gguf_bytes_per_token(untied) == 511
    tied = {k: v for k, v in untied.items() if k != "output.weight"}
    assert llamacpp_tools.gguf_bytes_per_token(tied) == 1011


# ---- llama.cpp tools ----------------------------------------------------------------------------------------
def test_a_missing_tool_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    with pytest.raises(LeanlmError, match=re.escape("bash benchmarks/setup_peers.sh --tools")):
        llamacpp_tools.tool("llama-quantize")
    with pytest.raises(LeanlmError, match=re.escape("bash benchmarks/setup_peers.sh --tools")):
        llamacpp_tools.convert_script()
    binary = tmp_path / f"llama.cpp-{llamacpp_tools.LLAMA_CPP_PYTHON_VERSION}" / "build" / "bin" / "llama-quantize"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert llamacpp_tools.tool("llama-quantize") == binary


def test_tools_version_is_the_one_setup_peers_builds():
    script = (ROOT / "benchmarks" / "setup_peers.sh").read_text()
    assert f"LLAMA_CPP_PYTHON_VERSION={llamacpp_tools.LLAMA_CPP_PYTHON_VERSION}\n" in script
    for t in llamacpp_tools.TOOLS:
        assert t in script


def test_convert_input_names_the_architecture_a_converted_directory_lacks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": None, "vocab_size": 5}))
    (src / "model.safetensors").write_bytes(b"x")
    staged = llamacpp_tools._convert_input(src, tmp_path / "stage")
    assert json.loads((staged / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (staged / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    assert json.loads((src / "config.json").read_text())["architectures"] is None  # the source is untouched
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert llamacpp_tools._convert_input(src, tmp_path / "stage2") == src
    (src / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(LeanlmError, match="no_such_model"):
        llamacpp_tools._convert_input(src, tmp_path / "stage3")


def test_fingerprint_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 100)
    before = llamacpp_tools.directory_fingerprint(tmp_path)
    assert llamacpp_tools.directory_fingerprint(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"b" * 100)
    assert llamacpp_tools.directory_fingerprint(tmp_path) != before


# ---- busy core, phases, arguments -------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_busy_core_spins_and_is_killed_even_when_the_run_fails():
    with pytest.raises(RuntimeError, match="boom"):
        with common.BusyCore(cpu=-1) as b:
            pid = b.proc.pid
            assert _alive(pid)
            time.sleep(0.5)
            raise RuntimeError("boom")
    assert not _alive(pid) and b.proc.returncode is not None
    assert b.report()["spinner_cpu_s"] > 0.1  # it spun (a whole core when one is free)


def test_interleaved_speed_times_only_the_phases_asked():
    calls = []

    class Fake(common.Engine):
        name = "fake"

        def prefill(self, ids):
            calls.append("prefill")
            return 0.5

        def decode(self, ids, n):
            calls.append("decode")
            return 10.0

    out = common.interleaved_speed([Fake()], [1] * 8, [1] * 2, 4, runs=2, warmup=0, phases=("decode",))
    assert calls == ["decode", "decode"] and out["fake"] == {"decode_tok_s": 10.0, "decode_tok_s_runs": [10.0, 10.0]}
    out = common.interleaved_speed([Fake()], [1] * 8, [1] * 2, 4, runs=1, warmup=0)
    assert out["fake"]["prefill_tok_s"] == 16.0 and out["fake"]["decode_tok_s"] == 10.0
    with pytest.raises(ValueError):
        common.interleaved_speed([Fake()], [1], [1], 4, runs=1, phases=("train",))


def test_narrowed_runs_are_partial_and_quick_sets_small_defaults():
    full = bench_peers.parse_args([])
    assert full.models == list(bench_peers.MODELS) and full.runs == 3 and full.prompt_len == 512
    assert not bench_peers.is_partial(full, {})
    assert bench_peers.is_partial(full, {"openvino": "not installed"})
    for argv in (["--models", "smollm2-135m"], ["--modes", "idle"], ["--no-openvino"], ["--gguf-types", "q8_0"],
                 ["--prompt-len", "128"], ["--quick"]):  # fmt: skip
        assert bench_peers.is_partial(bench_peers.parse_args(argv), {}), argv
    quick = bench_peers.parse_args(["--quick", "--runs", "2"])
    assert quick.models == ["smollm2-135m"] and quick.runs == 2 and quick.prompt_len == 64
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--modes", "idle,sleepy"])


def test_dram_read_bandwidth_reports_a_positive_rate():
    bw = common.dram_read_bandwidth(gb=0.05, repeats=2)
    assert bw["dram_read_gb_s"] > 0 and bw["tensor_gb"] == pytest.approx(0.05) and len(bw["sum_s_runs"]) == 2
    assert bw["threads"] == torch.get_num_threads()


def test_busy_mode_times_leanlm_and_the_paired_llamacpp_types_unless_asked_for_all():
    e = synthetic_engines()
    for name, t in (("llama.cpp-f16", "f16"), ("llama.cpp-q8_0", "q8_0"), ("llama.cpp-q4_0", "q4_0"),
                    ("llama.cpp-q4_k_m", "q4_k_m"), ("openvino-q8_0", "q8_0"), ("openvino-q4_0", "q4_0")):
        e[name]["type"] = t
    chosen = {n for n, r in e.items() if bench_peers.busy_engine(r, busy_all=False)}
    assert chosen == {"leanlm-bf16", "leanlm-int8", "leanlm-int4", "llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-q4_0"}
    assert all(bench_peers.busy_engine(r, busy_all=True) for r in e.values())


def test_quality_plan_picks_grids_and_heads():
    """bench_quality_peers.plan: the int4 point is one 4-bit grid with a 4-bit head; a richer point takes the 6-bit
    head and the richest decoder grid that fits, promoting to the next grid; a tied model (no 6-bit head) follows
    TIED_HEAD_ORDER; a point no setting reaches gives None."""
    import bench_quality_peers as bqp

    n_params, n_dec = 630_000_000, 358_000_000
    head = 136_000_000
    outside = {"int8": 2 * head * 8, "int8-g32-embed-int4": head * (8.5 + 4.5), "int8-embed-int4": head * (8 + 4.5),
               "int6-g32-embed-int4": head * (6.5 + 4.5), "int4-g32": head * 9.0}  # fmt: skip
    p = bqp.plan(4.51, outside, n_dec, n_params, False, "iq4nl", bqp.HEAD_ORDER)
    assert (p["head"], p["low"]) == ("int4-g32", "cb4-iq4nl-g32")
    p = bqp.plan(6.08, outside, n_dec, n_params, True, "iq4nl", bqp.HEAD_ORDER)
    assert (p["head"], p["low"], p["high"]) == ("int6-g32-embed-int4", "cb6-signed-g32", "int8-pc-sym")
    p = bqp.plan(5.35, outside, n_dec, n_params, True, "iq4nl", bqp.HEAD_ORDER)
    assert (p["low"], p["high"]) == ("cb4-iq4nl-g32", "cb5-signed-g32") and 4.5 < p["decoder_bits"] < 5.5
    tied = {**outside, "int6-g32-embed-int4": None}
    p = bqp.plan(6.08, tied, n_dec, n_params, True, "iq4nl", bqp.TIED_HEAD_ORDER)
    assert p["head"] == "int8"
    assert bqp.plan(3.0, outside, n_dec, n_params, True, "iq4nl", bqp.HEAD_ORDER) is None
    cfg = bqp.leanlm_config(bqp.plan(6.08, outside, n_dec, n_params, True, "iq4nl", bqp.HEAD_ORDER), lambda: {})
    assert (cfg.bits, cfg.levels, cfg.head_bits, cfg.mixed.high) == (6, "signed", 6, bqp.QSpec(8, 0, True))
