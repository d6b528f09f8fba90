#!/usr/bin/env bash
# Install the peer engines the benchmarks compare against (never package or test dependencies):
# llama.cpp through llama-cpp-python (builds from source: ~10 minutes on 2 cores) and OpenVINO GenAI.
#
#   bash benchmarks/setup_peers.sh           # the python engines only
#   bash benchmarks/setup_peers.sh --tools   # also llama.cpp's own tools (llama-quantize, llama-bench,
#                                            # llama-perplexity, llama-imatrix) and convert_hf_to_gguf.py
#
# The tools are built with cmake from vendor/llama.cpp of the llama-cpp-python sdist of the same version as the
# python engine, so the GGUFs bench_peers.py makes are read by the same llama.cpp that it times. They go to
# $LEANLM_CACHE/llama.cpp-<version>/ (default ~/.cache/leanlm/...): src/ (the vendor tree, with
# convert_hf_to_gguf.py and gguf-py), build/bin/ (the tools): 10-30 minutes on 2 cores. Idempotent: skips what is
# already there.
set -euo pipefail
PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON_VERSION=0.3.36
TOOLS=0
for arg in "$@"; do
    case "$arg" in
        --tools) TOOLS=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "setup_peers.sh: unknown option $arg (known: --tools)" >&2; exit 2 ;;
    esac
done

"$PY" -c "import llama_cpp" 2>/dev/null || "$PY" -m pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
"$PY" -c "import openvino_genai" 2>/dev/null || "$PY" -m pip install -q openvino-genai
"$PY" -c "import llama_cpp, openvino_genai; print('peers ready: llama-cpp-python', llama_cpp.__version__)"

[ "$TOOLS" = 1 ] || exit 0

CACHE=${LEANLM_CACHE:-$HOME/.cache/leanlm}
ROOT="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
SRC="$ROOT/src"
BUILD="$ROOT/build"
TARGETS=(llama-quantize llama-bench llama-perplexity llama-imatrix)
mkdir -p "$ROOT"

all_built() {
    for t in "${TARGETS[@]}"; do [ -x "$BUILD/bin/$t" ] || return 1; done
    [ -f "$SRC/convert_hf_to_gguf.py" ]
}

if ! [ -f "$SRC/convert_hf_to_gguf.py" ]; then
    SDIST="$ROOT/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    if ! [ -f "$SDIST" ]; then
        echo "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
        "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$ROOT"
    fi
    # Only the vendored llama.cpp tree is needed; unpack to a temporary name and move it into place at the end
    # so an interrupted unpack is never taken for a finished one.
    rm -rf "$ROOT/unpack"
    mkdir -p "$ROOT/unpack"
    tar xzf "$SDIST" -C "$ROOT/unpack" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    rm -rf "$SRC"
    mv "$ROOT/unpack/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$ROOT/unpack"
fi

# convert_hf_to_gguf.py imports gguf from $SRC/gguf-py (put on PYTHONPATH by benchmarks/llamacpp_tools.py, so it
# never shadows another installed gguf) and a few PyPI packages; install only the missing ones.
for mod_pkg in numpy:numpy sentencepiece:sentencepiece safetensors:safetensors transformers:transformers \
               yaml:pyyaml tqdm:tqdm google.protobuf:protobuf; do
    mod=${mod_pkg%%:*}; pkg=${mod_pkg##*:}
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "$pkg"
done

if all_built; then
    echo "llama.cpp tools ready in $BUILD/bin"
    exit 0
fi

JOBS=${JOBS:-2}
start=$(date +%s)
# GGML_NATIVE: -march=native, this CPU's own flags (AVX-512 VNNI/BF16 where present; llama-cpp-python built from
# source on this machine gets the same default). No curl (nothing is fetched), no tests/examples/server: only the
# four tools are built.
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
      -DBUILD_SHARED_LIBS=OFF
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"
all_built || { echo "setup_peers.sh: the build finished but a tool is missing from $BUILD/bin" >&2; exit 1; }
echo "llama.cpp tools built in $(( $(date +%s) - start )) s: $BUILD/bin"
