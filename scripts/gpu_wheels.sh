#!/usr/bin/env bash
# Prepare .gpu-wheels/ (carried to the GPU machine, which has no package registry): the wheels of
# what scripts/gpu_check.sh may find missing there, for CPython 3.10-3.13 on x86_64 Linux, plus
# Qwen's BPE ranks (qwen.tiktoken, from the installed dashscope) for the real tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GTR_WHEELS:-.gpu-wheels}
mkdir -p "$OUT"
PURE="fastapi starlette anyio idna h11 click uvicorn python-multipart pydantic annotated-types
typing-inspection annotated-doc typing-extensions gymnasium cloudpickle farama-notifications
prometheus-client urllib3 httpx httpcore certifi tqdm"
# Versions as installed here, so the set is one that works together.
pins=()
for d in $PURE pydantic-core pyyaml; do
  v=$($PY -c "import importlib.metadata as m; print(m.version('$d'))" 2>/dev/null) && pins+=("$d==$v")
done
$PY -m pip download -q --no-deps -d "$OUT" $(printf '%s\n' "${pins[@]}" | grep -v -E '^(pydantic-core|pyyaml)==')
for py in 3.10 3.11 3.12 3.13; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT" \
    $(printf '%s\n' "${pins[@]}" | grep -E '^(pydantic-core|pyyaml)==') || echo "no binary wheels for $py"
done
$PY - "$OUT" <<'PYEOF'
import shutil, sys
from shared.qwen_tokenizer import ranks_file
shutil.copy(ranks_file(), f"{sys.argv[1]}/qwen.tiktoken")
PYEOF
du -sh "$OUT"
