#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite: unit tests on tiny random models and
# integration tests on the real SmolLM2 / Gemma 3 models, reading data from $LEANLM_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LEANLM_DATA=${LEANLM_DATA:-$(cd .. && pwd)/shared/data}
python3 -m pytest -q -p no:cacheprovider "$@"
