"""benchmarks/bench_long_context.py: a --quick run on a tiny model writes an archived result with every field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_long_context.py"


needs_books = pytest.mark.skipif(not (DATA / "gutenberg" / "pg2701.txt").is_file(),
                                 reason="set LEANLM_DATA to shared/data")  # fmt: skip


def run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LEANLM_DATA": str(DATA)}
    return subprocess.run([sys.executable, str(BENCH), *args, "--results-root", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@needs_books
def test_quick_run_on_a_tiny_model(tiny_dirs, tmp_path):
    p = run(["--quick", "--models", str(tiny_dirs["llama"]), "--contexts", "192", "--threads", "1"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    files = list(tmp_path.glob("archive/*/long_context.json"))
    assert len(files) == 1 and not (tmp_path / "long_context.json").exists()  # --quick is partial: archive only
    res = json.loads(files[0].read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"full", "sinks:4,window:44", "tga:group=16,window=24", "int8"}
    for r in rows.values():
        assert r["context"] == 192 and r["tokens_scored"] > 0 and r["decode_tok_s"] > 0 and r["kv_bytes"] > 0
        assert len(r["needle"]) == 1 and r["needle"][0]["prompt_tokens"] <= 192
    assert rows["full"]["ppl_vs_full"] == 0 and rows["int8"]["kv_bytes_reduction"] > 1
    assert rows["tga:group=16,window=24"]["kv_bytes"] < rows["full"]["kv_bytes"]
    assert set(res["summary"]) >= {"best_sparse_decode_speedup_8k_within_2pct", "best_sparse_needle_recall",
                                   "best_kv_bytes_reduction_within_2pct", "int8_kv_decode_vs_bf16_kv_8k"}
    assert res["wall_s"] > 0 and res["complete"] is False and res["provenance"]["machine"]


def test_a_spec_that_does_not_parse_stops_the_run(tmp_path):
    p = run(["--quick", "--methods", "full;quest:pages=bad"], tmp_path)
    assert p.returncode != 0 and "quest:pages=bad" in p.stderr and "does not parse" in p.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_scoring_in_small_chunks_equals_large_chunks_under_full_attention(tiny_dirs):
    """score_chunk only changes how the scored tokens are fed; with the plain cache the scores are the same."""
    import torch

    from leanlm import load
    from leanlm.attention.longctx import _chunks, chunked_prefill

    assert _chunks(100, 32, 40, 70, 16) == [(0, 32), (32, 40), (40, 56), (56, 72), (72, 100)]
    model, _ = load(str(tiny_dirs["llama"]), "float32")
    ids = torch.randint(3, 90, (1, 120), generator=torch.Generator().manual_seed(0))
    a = chunked_prefill(model, ids, None, 32, score=True, score_range=(50, 100))
    b = chunked_prefill(model, ids, None, 32, score=True, score_range=(50, 100), score_chunk=16)
    assert a[1] == b[1] == 50
    assert abs(a[0] - b[0]) < 1e-3 * abs(a[0])
    # every chunk runs in inference mode, even when called with autograd on: with autograd on, the chunks'
    # graphs stayed alive (~0.8 GB a chunk on Qwen2.5-0.5B, whose loaded parameters require grad)
    seen = []
    forward = model.forward
    model.forward = lambda *a, **k: seen.append(torch.is_inference_mode_enabled()) or forward(*a, **k)
    assert torch.is_grad_enabled()
    chunked_prefill(model, ids, None, 32, score=True, score_range=(50, 100))
    assert len(seen) == 4 and all(seen)
