#!/usr/bin/env bash
# The GPU checks of issue 15 in one run (benchmarks/gpu_check.py): random-weight Qwen2.5-VL-3B/7B
# in bf16, teacher log-probs vs a plain forward (version 0 and after a TIES merge), merge seconds
# for K = 2..16 LoRA r128 checkpoints, trainer seconds per update (guidance none / kl), peak GPU
# memory. Writes bench-results/gpu.json (and $OUT/gpu.json).
#
#   bash scripts/gpu_wheels.sh                 # here, once: the wheels the GPU machine lacks -> .gpu-wheels/
#   run(carry=[".gpu-wheels"], command="bash scripts/gpu_check.sh", timeout_s=400)
#     (6 min of checks: with a ~3 min machine start that leaves a rerun inside 15 device-minutes,
#      e.g. `bash scripts/gpu_check.sh --sizes 3B` for what the first run skipped)
#   bash scripts/gpu_check.sh --cpu-smoke      # the same code path on CPU, shrunken configs
#
# The GPU machine has torch/transformers/peft/safetensors and no package registry: modules it
# lacks are installed from the carried wheels folder (GTR_WHEELS, default .gpu-wheels) into
# .gpu-pylib, which goes first on PYTHONPATH. Qwen's BPE ranks (qwen.tiktoken) travel there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WHEELS=${GTR_WHEELS:-.gpu-wheels}
LIB=${GTR_PYLIB:-.gpu-pylib}
TIMEOUT=${GTR_GPU_CHECK_TIMEOUT:-360}
BUDGET=${GTR_GPU_CHECK_BUDGET:-300}

# import name -> distribution name, for everything the services import beyond torch & co.
MODULES="fastapi:fastapi starlette:starlette anyio:anyio idna:idna h11:h11 click:click
uvicorn:uvicorn multipart:python-multipart pydantic:pydantic pydantic_core:pydantic-core
annotated_types:annotated-types typing_inspection:typing-inspection annotated_doc:annotated-doc
typing_extensions:typing-extensions gymnasium:gymnasium cloudpickle:cloudpickle
farama_notifications:farama-notifications prometheus_client:prometheus-client yaml:pyyaml
urllib3:urllib3 httpx:httpx httpcore:httpcore certifi:certifi tqdm:tqdm PIL:pillow numpy:numpy"
missing=()
for pair in $MODULES; do
  mod=${pair%%:*}; dist=${pair##*:}
  PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}" $PY -c "import $mod" 2>/dev/null && continue
  # Only what the folder holds (a module newer releases no longer need has no wheel there).
  if ls "$WHEELS" 2>/dev/null | grep -qi "^${dist//-/_}-"; then missing+=("$dist")
  else echo "gpu_check: $mod is not importable and $WHEELS has no $dist wheel (continuing)"; fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check: installing from $WHEELS: ${missing[*]}"
  # --no-deps: exactly the missing modules (their dependencies are in the list too).
  $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$LIB" "${missing[@]}"
fi
export PYTHONPATH="$PWD/$LIB:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${GTR_QWEN_RANKS:-}" ] && [ -f "$WHEELS/qwen.tiktoken" ]; then
  export GTR_QWEN_RANKS="$PWD/$WHEELS/qwen.tiktoken"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
exec timeout --signal=TERM --kill-after=20 "$TIMEOUT" $PY -m benchmarks.gpu_check --budget-s "$BUDGET" "$@"
