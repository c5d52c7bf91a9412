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


class TeacherReplicas:
    """Teacher replicas behind one object (`teacher.url` with several URLs).

    Requests spread round-robin over the replicas, starting at `start` (the trainer's rank, so
    ranks begin on different replicas), and run in parallel, one thread per replica. `/logits` and
    `/generate` only read, so a request whose replica is unreachable or not ready (after that
    client's retries) is sent to the next replica; any other error is final. Uploads go to every
    replica: each merges the same checkpoints and reaches the same version.
    """

    def __init__(self, urls: list[str], timeout: float = 300.0, retries: int = 4, token: str | None = None,
                 start: int = 0, clients: list[TeacherClient] | None = None):
        if not urls and not clients:
            raise ValueError("no teacher URL")
        self.clients = clients or [TeacherClient(u, timeout=timeout, retries=retries, token=token) for u in urls]
        self._start = start % len(self.clients)
        self._pool = None

    def __len__(self) -> int:
        return len(self.clients)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients:
            c.close()

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="teacher-replica")
        return self._pool

    def _one(self, first: int, call):
        """call(client) on replica `first`, then on the others while it is unreachable / not ready."""
        from shared.client import RETRY_STATUS, ServiceError

        last: ServiceError | None = None
        for k in range(len(self.clients)):
            client = self.clients[(first + k) % len(self.clients)]
            try:
                return call(client)
            except ServiceError as e:
                if e.status is not None and e.status not in RETRY_STATUS:
                    raise
                last = e
        assert last is not None
        raise last

    def map(self, call, requests: list) -> list:
        """call(client, request) for each request, spread over the replicas; replies in order."""
        n = len(self.clients)
        firsts = [(self._start + i) % n for i in range(len(requests))]
        self._start = (self._start + len(requests)) % n
        if n == 1 or len(requests) <= 1:
            return [self._one(f, lambda c, r=r: call(c, r)) for f, r in zip(firsts, requests, strict=True)]
        futures = [self._executor().submit(self._one, f, lambda c, r=r: call(c, r))
                   for f, r in zip(firsts, requests, strict=True)]
        return [f.result() for f in futures]

    def logits(self, requests: list[LogitsRequest]) -> list[LogitsResponse]:
        return self.map(lambda c, r: c.logits(r), requests)

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResponse]:
        return self.map(lambda c, r: c.generate(r), requests)

    def each(self, call, clients: list[TeacherClient] | None = None) -> list:
        """call(client) on every replica (or on `clients`, some of them), in parallel; each entry
        the reply or the ServiceError raised."""
        from shared.client import ServiceError

        def safe(c):
            try:
                return call(c)
            except ServiceError as e:
                return e

        clients = self.clients if clients is None else clients
        if len(clients) == 1:
            return [safe(clients[0])]
        return list(self._executor().map(safe, clients))
