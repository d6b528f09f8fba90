#!/usr/bin/env bash
# Fresh machine -> the main job on the default model: set up, then measure SmolLM2-135M
# (perplexity, speed, memory; fp32 and the bf16 path) and generate a sample answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LEANLM_DATA=${LEANLM_DATA:-$(cd .. && pwd)/shared/data}
mkdir -p runs
leanlm eval smollm2-135m --ppl --speed --memory --json runs/smollm2-fp32.json --force
leanlm eval smollm2-135m --dtype bfloat16 --ppl --speed --memory --json runs/smollm2-bf16.json --force
leanlm generate smollm2-135m --dtype bfloat16 --prompt "Explain in two sentences why smaller language models are cheaper to run."
