"""Python client of the teacher service (DESIGN §3.2), used by the trainer and `gtr teacher query`.

    client = TeacherClient("http://127.0.0.1:8200")
    client.wait_ready()
    client.upload_adapter("runs/x/adapter-step3", step=3)   # what peft's save_pretrained wrote
    resp = client.logits(LogitsRequest(items=[...], tokenizer_fingerprint=fp))
"""

from __future__ import annotations

from pathlib import Path

from shared.client import ServiceClient
from shared.schemas import (ActionResponse, CheckpointList, CheckpointUploadResponse, GenerateRequest,
                            GenerateResponse, LogitsRequest, LogitsResponse, MergeReport, TeacherInfo)

ADAPTER_MODEL = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class TeacherClient(ServiceClient):
    def __init__(self, base_url: str = "http://127.0.0.1:8200", timeout: float = 300.0, retries: int = 4,
                 token: str | None = None, **kw):
        super().__init__(base_url, service="teacher", timeout=timeout, retries=retries, token=token, **kw)

    def info(self) -> TeacherInfo:
        return self.get("/v1/teacher", model=TeacherInfo)

    def checkpoints(self) -> CheckpointList:
        return self.get("/v1/checkpoints", model=CheckpointList)

    def upload_adapter(self, adapter_dir: str | Path, step: int,
                       base_fingerprint: str | None = None) -> CheckpointUploadResponse:
        """Upload the two files peft's `save_pretrained` wrote into `adapter_dir`."""
        d = Path(adapter_dir)
        model_file, config_file = d / ADAPTER_MODEL, d / ADAPTER_CONFIG
        for f in (model_file, config_file):
            if not f.exists():
                raise FileNotFoundError(f"{f} not found: upload the directory peft's save_pretrained wrote")
        return self.upload_bytes(model_file.read_bytes(), config_file.read_bytes(), step, base_fingerprint)

    def upload_bytes(self, model_bytes: bytes, config_bytes: bytes, step: int,
                     base_fingerprint: str | None = None) -> CheckpointUploadResponse:
        files = {"adapter_model": (ADAPTER_MODEL, model_bytes, "application/octet-stream"),
                 "adapter_config": (ADAPTER_CONFIG, config_bytes, "application/json")}
        data = {"step": str(int(step))}
        if base_fingerprint:
            data["base_fingerprint"] = base_fingerprint
        return self.request("POST", "/v1/checkpoints", files=files, data=data, model=CheckpointUploadResponse)

    def delete_checkpoint(self, checkpoint_id: str) -> ActionResponse:
        return self.delete(f"/v1/checkpoints/{checkpoint_id}", model=ActionResponse)

    def merge(self) -> MergeReport:
        return self.post("/v1/merge", model=MergeReport)

    def logits(self, request: LogitsRequest) -> LogitsResponse:
        return self.post("/v1/logits", json=request, model=LogitsResponse)

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        return self.post("/v1/generate", json=request, model=GenerateResponse)
