"""llama.cpp's own tools, built by `bash benchmarks/setup_peers.sh --tools`, and the GGUFs they make.

The tools (llama-quantize, llama-bench, llama-perplexity, llama-imatrix) and convert_hf_to_gguf.py come from
vendor/llama.cpp of the llama-cpp-python sdist of LLAMA_CPP_PYTHON_VERSION, the llama.cpp that the benchmarks
time through llama-cpp-python; they live under $LEANLM_CACHE/llama.cpp-<version>/ (src/, build/bin/).

build_ggufs() makes F16 (convert_hf_to_gguf.py --outtype f16) and the quantized types (llama-quantize from that
F16) of an HF directory, cached under $LEANLM_CACHE/peers-gguf/ keyed on the directory's fingerprint, so a re-run
on the same weights reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import LeanlmError
from ..model.load import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep equal to benchmarks/setup_peers.sh (a test checks)
# `leanlm optimize` and the benchmarks use these tools; a pip-installed leanlm has no benchmarks/ folder, so the
# hint names both the script and what it does
TOOLS = ("llama-quantize", "llama-bench", "llama-perplexity", "llama-imatrix")
SETUP_HINT = "bash benchmarks/setup_peers.sh --tools"  # from a leanlm checkout
# GGUF types bench_peers.py compares, with the weight bits of the leanlm path each stands beside
GGUF_TYPES = {"f16": 16, "q8_0": 8, "q4_0": 4, "q4_k_m": 4}


def tools_root() -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def tool(name: str) -> Path:
    """The path of one built tool (e.g. "llama-quantize"); LeanlmError naming the setup command when missing."""
    path = tools_root() / "build" / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LeanlmError(f"llama.cpp tool {name} not found at {path}: build llama.cpp's tools with `{SETUP_HINT}` "
                          "(10-30 minutes on 2 cores)")  # fmt: skip
    return path


def convert_script() -> Path:
    path = tools_root() / "src" / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise LeanlmError(f"convert_hf_to_gguf.py not found at {path}: unpack llama.cpp with `{SETUP_HINT}`")
    return path


def _vendor_env() -> dict:
    """The environment for the vendor tree's python scripts: its own gguf-py first on the path, so a different
    installed `gguf` never answers for it."""
    env = dict(os.environ)
    gguf_py = str(tools_root() / "src" / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join([gguf_py, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise LeanlmError(f"{what} failed (exit {out.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return out


def directory_fingerprint(directory: Path) -> str:
    """Identity of an HF directory's weights and config: config.json's bytes and, per safetensors file, its name,
    size and first/last MiB (the cheap identity leanlm's GGUF cache uses)."""
    from ..model.load import _fingerprint

    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f"{f.name}:{_fingerprint(f)}".encode())
    return h.hexdigest()[:12]


def _convert_input(directory: Path, staging: Path) -> Path:
    """The directory convert_hf_to_gguf.py reads: `directory` itself, or, when its config.json names no
    architecture (leanlm's GGUF-converted directories), a staging folder of links to its files with the
    architecture filled in from model_type by transformers' own causal-LM mapping."""
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("architectures"):
        return directory
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type", ""))
    if arch is None:
        raise LeanlmError(f"{directory}/config.json names no architecture and model_type "
                          f"'{cfg.get('model_type')}' has no causal-LM class in transformers")  # fmt: skip
    staging.mkdir(parents=True, exist_ok=True)
    for f in directory.iterdir():
        if f.name != "config.json":
            (staging / f.name).symlink_to(f.resolve())
    (staging / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}, indent=2))
    return staging


def convert_hf_to_f16(directory: Path, out: Path) -> Path:
    """convert_hf_to_gguf.py --outtype f16 on `directory`, written atomically to `out`."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="leanlm_convert_") as stage:
        src = _convert_input(Path(directory), Path(stage) / "model")
        _run([sys.executable, str(convert_script()), "--outtype", "f16", "--outfile", str(tmp), str(src)],
             "convert_hf_to_gguf.py", env=_vendor_env())  # fmt: skip
    tmp.rename(out)
    return out


def quantize_gguf(src: Path, out: Path, qtype: str, threads: int, imatrix: Path | None = None) -> Path:
    """llama-quantize [--imatrix IMATRIX] SRC OUT QTYPE THREADS, written atomically to `out`."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    _run([str(tool("llama-quantize")), *extra, str(src), str(tmp), qtype.upper(), str(threads)],
         f"llama-quantize {qtype}")  # fmt: skip
    tmp.rename(out)
    return out


def compute_imatrix(gguf: Path, text_file: Path, out: Path, seq_len: int, chunks: int, threads: int) -> Path:
    """llama-imatrix over `chunks` chunks of `seq_len` tokens of `text_file` (llama.cpp's importance matrix: the
    mean squared activation of every weight's input column), written atomically to `out` (GGUF format)."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}.gguf")
    _run([str(tool("llama-imatrix")), "-m", str(gguf), "-f", str(text_file), "-o", str(tmp), "-c", str(seq_len),
          "--chunks", str(chunks), "-t", str(threads), "--no-ppl"], "llama-imatrix")  # fmt: skip
    tmp.rename(out)
    return out


def build_ggufs(directory: str | Path, name: str, types=tuple(GGUF_TYPES), threads: int = 2,
                log=print) -> dict[str, Path]:  # fmt: skip
    """{type: path} of GGUFs of `directory` made by llama.cpp's converter (f16) and quantizer (the others, from
    that f16), cached in $LEANLM_CACHE/peers-gguf/NAME-FINGERPRINT/ so re-runs on the same weights are quick."""
    directory = Path(directory)
    unknown = set(types) - set(GGUF_TYPES)
    if unknown:
        raise LeanlmError(f"unknown GGUF types {sorted(unknown)}; known: {', '.join(GGUF_TYPES)}")
    folder = cache_root() / "peers-gguf" / f"{name}-{directory_fingerprint(directory)}"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / f"{name}-f16.gguf"
    out = {}
    for t in types:
        path = folder / f"{name}-{t}.gguf"
        if not path.exists():
            if not f16.exists():
                log(f"  converting {directory} to F16 GGUF (convert_hf_to_gguf.py)")
                convert_hf_to_f16(directory, f16)
            if t != "f16":
                log(f"  llama-quantize F16 -> {t.upper()}")
                quantize_gguf(f16, path, t, threads)
        out[t] = path
    return out


_TENSORS_SCRIPT = """
import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
print(json.dumps({t.name: {"type": t.tensor_type.name, "bytes": int(t.n_bytes), "shape": [int(x) for x in t.shape]}
                  for t in r.tensors}))
"""


def gguf_tensors(path: str | Path) -> dict[str, dict]:
    """{tensor name: {"type", "bytes", "shape"}} of a GGUF, read by the vendor tree's gguf-py (in a subprocess,
    so its `gguf` never mixes with another one imported here)."""
    out = _run([sys.executable, "-c", _TENSORS_SCRIPT, str(path)], f"reading {path}", env=_vendor_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def gguf_bytes_per_token(tensors: dict[str, dict]) -> int:
    """Weight bytes a decoded token reads in llama.cpp: every tensor but the token embedding (a row lookup),
    plus the embedding once more when it doubles as the output head (no output.weight)."""
    total = sum(t["bytes"] for n, t in tensors.items() if n != "token_embd.weight")
    if "output.weight" not in tensors and "token_embd.weight" in tensors:
        total += tensors["token_embd.weight"]["bytes"]
    return total
