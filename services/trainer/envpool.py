"""`num_envs` sessions on the env service (DESIGN §3.1), stepped together with one batched call.

Seeds are deterministic: the trainer passes them, so an update's episodes are the same
whether the run was resumed or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from shared.client import ServiceClient
from shared.schemas import (BatchStepRequest, BatchStepResult, CreateSessionRequest, Observation, ResetRequest,
                            ResetResponse, SessionResponse)

log = logging.getLogger(__name__)


@dataclass
class EnvResult:
    observation: Observation
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class EnvPool:
    def __init__(self, url: str, env_id: str, num_envs: int, options: dict[str, Any] | None = None,
                 timeout_s: float = 60.0, retries: int = 4, client: ServiceClient | None = None):
        self.client = client or ServiceClient(url, service="env", timeout=timeout_s, retries=retries)
        self.env_id, self.num_envs, self.options = env_id, num_envs, dict(options or {})
        self.session_ids: list[str] = []

    def open(self, seeds: list[int]) -> list[EnvResult]:
        """Create the sessions (first call) or reset them, with one seed each."""
        if not self.session_ids:
            out = []
            for seed in seeds:
                r = self.client.post("/v1/sessions", json=CreateSessionRequest(env_id=self.env_id, seed=seed,
                                                                                options=self.options),
                                     model=SessionResponse)
                self.session_ids.append(r.session_id)
                out.append(EnvResult(r.observation, info=r.info))
            return out
        return [self.reset(i, s) for i, s in enumerate(seeds)]

    def reset(self, i: int, seed: int) -> EnvResult:
        r = self.client.post(f"/v1/sessions/{self.session_ids[i]}/reset", json=ResetRequest(seed=seed),
                             model=ResetResponse)
        return EnvResult(r.observation, info=r.info)

    def step(self, actions: list[str], which: list[int] | None = None) -> list[EnvResult]:
        """Step sessions `which` (default all) with the model's raw outputs, in one request."""
        which = list(range(self.num_envs)) if which is None else which
        req = BatchStepRequest(steps=[{"session_id": self.session_ids[i], "action": a}
                                      for i, a in zip(which, actions, strict=True)])
        data = self.client.post("/v1/step", json=req)
        items = data if isinstance(data, list) else (data.get("results") or data.get("steps") or data.get("items"))
        out = []
        for i, raw in zip(which, items, strict=True):
            r = BatchStepResult.model_validate(raw)
            if r.error is not None or r.observation is None:
                out.append(self._replace_failed(i, r))
                continue
            out.append(EnvResult(r.observation, r.reward, r.terminated, r.truncated, r.info))
        return out

    def _replace_failed(self, i: int, r: BatchStepResult) -> EnvResult:
        """An exception inside one env fails that session alone (DESIGN §3.1): open a new one in
        its place and end the episode there (terminated, no bootstrap, no reward, no format term)."""
        detail = r.error.detail if r.error else "no observation"
        log.warning("env session %s failed (%s); replacing it", r.session_id, detail)
        new = self.client.post("/v1/sessions", json=CreateSessionRequest(env_id=self.env_id, options=self.options),
                               model=SessionResponse)
        self.session_ids[i] = new.session_id
        return EnvResult(new.observation, 0.0, True, False, {"env_error": detail, "won": False})

    def close(self) -> None:
        for sid in self.session_ids:
            try:
                self.client.delete(f"/v1/sessions/{sid}", retries=0)
            except Exception as e:  # noqa: BLE001 - sessions also expire by TTL; closing is best effort
                log.debug("closing env session %s: %s", sid, e)
        self.session_ids = []
        self.client.close()
