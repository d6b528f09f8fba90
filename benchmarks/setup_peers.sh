#!/usr/bin/env bash
# Install the peer engines the benchmarks compare against (never package or test dependencies):
# llama.cpp through llama-cpp-python (builds from source: ~10 minutes on 2 cores) and OpenVINO GenAI.
# Idempotent: skips what is already importable.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -c "import llama_cpp" 2>/dev/null || "$PY" -m pip install -q llama-cpp-python
"$PY" -c "import openvino_genai" 2>/dev/null || "$PY" -m pip install -q openvino-genai
"$PY" -c "import llama_cpp, openvino_genai; print('peers ready: llama-cpp-python', llama_cpp.__version__)"
