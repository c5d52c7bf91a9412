"""Python client of the policy service (DESIGN §3.4): the teacher's API, named for its errors.

    client = PolicyClient("http://127.0.0.1:8400")
    client.upload_adapter(adapter_dir, step=3)       # then poll info().served_checkpoints
    resp = client.generate(GenerateRequest(items=[...]))   # resp.teacher_version: the adapter version
"""

from __future__ import annotations

from shared.teacher_client import TeacherClient


class PolicyClient(TeacherClient):
    def __init__(self, base_url: str = "http://127.0.0.1:8400", timeout: float = 300.0, retries: int = 4,
                 token: str | None = None, **kw):
        super().__init__(base_url, timeout=timeout, retries=retries, token=token, **kw)
        self.service = "policy"  # what its errors say
