#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite: unit tests on tiny random models and
# integration tests on the real SmolLM2 / Gemma 3 / Qwen2.5 models, reading data from $LEANLM_DATA.
# The peer engines (llama-cpp-python, openvino-genai: benchmarks/setup_peers.sh, python engines only) are
# installed too, so the llama.cpp compatibility tests of the GGUF export run; the first install builds
# llama.cpp from source (~10 minutes on 2 cores), later ones reuse the wheel pip cached. LEANLM_SKIP_PEERS=1
# skips that install (those tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${LEANLM_SKIP_PEERS:-0}" = 1 ] || bash benchmarks/setup_peers.sh
export LEANLM_DATA=${LEANLM_DATA:-$(cd .. && pwd)/shared/data}
python3 -m pytest -q -p no:cacheprovider "$@"
