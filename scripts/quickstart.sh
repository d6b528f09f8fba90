#!/usr/bin/env bash
# Fresh machine -> the main job on the default model: set up, measure SmolLM2-135M (perplexity,
# speed, memory; fp32 and the bf16 path), make it cheaper with a recipe (GPTQ int4, group 128,
# ~2 minutes), measure that against the original (ppl, KL, speed, size) and render the report:
# runs/smollm2-gptq4.html sets the int4 model beside both bases, with ratios against the faster one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LEANLM_DATA=${LEANLM_DATA:-$(cd .. && pwd)/shared/data}
mkdir -p runs
leanlm eval smollm2-135m --ppl --speed --memory --json runs/smollm2-fp32.json --force
leanlm eval smollm2-135m --dtype bfloat16 --ppl --speed --memory --json runs/smollm2-bf16.json --force
leanlm compress smollm2-135m examples/recipes/gptq-int4.yaml --out runs/smollm2-gptq4 --force
leanlm eval runs/smollm2-gptq4 --ppl --speed --memory --kl-ref smollm2-135m --json runs/smollm2-gptq4.json --force
leanlm report runs/smollm2-gptq4.json --base runs/smollm2-fp32.json --base runs/smollm2-bf16.json --force
leanlm generate runs/smollm2-gptq4 --prompt "Explain in two sentences why smaller language models are cheaper to run."
