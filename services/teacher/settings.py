"""Teacher service settings: what `gtr teacher serve` flags become; validated at start-up."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from shared.config import StrictModel
from shared.schemas import MergeSettings
from services.teacher.service import validate_merge_settings


class TeacherSettings(StrictModel):
    backend: Literal["hf", "vllm", "openai"] = "hf"
    model: str
    """Model directory (hf, vllm) or the remote model name (openai)."""
    store: str
    """Checkpoint store directory (the teacher's volume)."""
    device: str | None = None
    """cuda, cuda:1, cpu; default: cuda when available."""
    dtype: str | None = None
    """float32 / bfloat16; default: bf16 on CUDA, fp32 on CPU."""
    merge_method: Literal["ties", "linear", "none"] = "ties"
    density: float = Field(default=0.5, gt=0, le=1)
    weighting: Literal["sma", "ema"] = "sma"
    ema_alpha: float = Field(default=0.5, gt=0, le=1)
    window: int | None = Field(default=None, ge=1)
    merge_every: int = Field(default=1, ge=1)
    scale: float = 1.0
    merge_device: str = "cpu"
    """Where merges compute (cpu, or the GPU for speed when memory allows)."""
    max_upload_mb: float = Field(default=1024.0, gt=0)
    max_tokens: int = Field(default=65536, ge=1)
    """Most padded tokens (batch x width) one /v1/logits or /v1/generate request may use."""
    openai_base_url: str | None = None
    openai_api_key_env: str = "OPENAI_API_KEY"
    host: str = "127.0.0.1"
    port: int = 8200
    vllm: dict[str, Any] = Field(default_factory=dict)
    """vllm backend only: `VllmSettings` fields (gpu_memory_utilization, max_model_len, ...)."""

    @model_validator(mode="after")
    def _merge_ok(self):
        validate_merge_settings(self.merge_settings())
        return self

    def merge_settings(self) -> MergeSettings:
        return MergeSettings(method=self.merge_method, density=self.density, weighting=self.weighting,
                             ema_alpha=self.ema_alpha, window=self.window, scale=self.scale,
                             merge_every=self.merge_every)

    def backend_settings(self) -> dict:
        if self.backend == "openai":
            return {"model": self.model, "base_url": self.openai_base_url, "api_key_env": self.openai_api_key_env}
        out = {"model": self.model, "device": self.device, "dtype": self.dtype, "max_tokens": self.max_tokens}
        if self.backend == "vllm":
            out["vllm"] = dict(self.vllm)
        return out
