"""Clients of the env service (DESIGN §3.1): a thin HTTP client, and a gymnasium `Env` that wraps
one remote session so that the service can be used like any gym env.

    from shared.env_client import EnvClient, RemoteEnv
    env = RemoteEnv("points24", base_url="http://127.0.0.1:8100", seed=0)
    obs, info = env.reset(seed=3)
    obs, reward, terminated, truncated, info = env.step('{"thoughts": "...", "action": "8"}')

Steps and resets are never retried: a step whose reply was lost may have been applied, and a
second try would silently play it twice. Reads and session creation are retried (a duplicate
session is harmless: it expires by the TTL).
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pydantic import TypeAdapter

from shared.client import ServiceClient
from shared.codecs import b64_to_image
from shared.schemas import (BatchStepResult, CreateSessionRequest, EnvList, ResetRequest, ResetResponse,
                            SessionResponse, StepRequest, StepResponse)

DEFAULT_URL = "http://127.0.0.1:8100"

# Validates a batch reply straight from its bytes (one pass in pydantic-core, no dicts in between).
_BATCH_RESULTS = TypeAdapter(list[BatchStepResult])


class EnvClient:
    """Typed calls to the env service, on top of `ServiceClient` (timeouts, retries, errors)."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 120.0, retries: int = 4,
                 token: str | None = None):
        self.http = ServiceClient(base_url, service="envs", timeout=timeout, retries=retries, token=token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.http.wait_ready(timeout)

    def envs(self) -> EnvList:
        return self.http.get("/v1/envs", model=EnvList)

    def create(self, env_id: str, seed: int | None = None, options: dict[str, Any] | None = None) -> SessionResponse:
        body = CreateSessionRequest(env_id=env_id, seed=seed, options=options or {})
        return self.http.post("/v1/sessions", body, model=SessionResponse)

    def reset(self, session_id: str, seed: int | None = None) -> ResetResponse:
        return self.http.post(f"/v1/sessions/{session_id}/reset", ResetRequest(seed=seed), model=ResetResponse, retries=0)

    def step(self, session_id: str, action: str) -> StepResponse:
        return self.http.post(f"/v1/sessions/{session_id}/step", StepRequest(action=action), model=StepResponse, retries=0)

    def step_batch(self, steps: list[tuple[str, str]], auto_reset: bool = False) -> list[BatchStepResult]:
        """One result per (session_id, action), in order; a failed step has `.error` set. With
        `auto_reset`, a finished episode restarts in the same call (its start in `.reset`)."""
        body = {"steps": [{"session_id": s, "action": a} for s, a in steps], "auto_reset": auto_reset}
        return self.http.post("/v1/step", body, retries=0, adapter=_BATCH_RESULTS)

    def delete(self, session_id: str) -> None:
        self.http.delete(f"/v1/sessions/{session_id}")


def observation_to_dict(obs, decode_image: bool = True) -> dict[str, Any]:
    image = obs.image
    if image is not None and decode_image:
        image = np.asarray(b64_to_image(image), dtype=np.uint8)
    return {"image": image, "text": obs.text, "instruction": obs.instruction,
            "admissible_actions": obs.admissible_actions}


class RemoteEnv(gym.Env):
    """A gymnasium env backed by one session of the env service.

    Observations are dicts: `image` (HxWx3 uint8, or None for text-only envs; the base64 PNG
    when `decode_images=False`), `text`, `instruction`, `admissible_actions`. The action is the
    model's raw output text. The session is created on the first `reset` and deleted by `close`.
    """

    metadata = {"render_modes": []}

    def __init__(self, env_id: str, base_url: str = DEFAULT_URL, options: dict[str, Any] | None = None,
                 client: EnvClient | None = None, decode_images: bool = True, max_action_chars: int = 20_000):
        self.env_id = env_id
        self.env_options = options or {}
        self.client = client or EnvClient(base_url)
        self._own_client = client is None
        self.decode_images = decode_images
        self.session_id: str | None = None
        # Model outputs are free text; the space documents that and is not used to filter them.
        self.action_space = spaces.Text(max_length=max_action_chars, charset=string.printable)
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, shape=(300, 300, 3), dtype=np.uint8),
            "text": spaces.Text(max_length=100_000, charset=string.printable),
            "instruction": spaces.Text(max_length=100_000, charset=string.printable),
        })

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options:
            raise ValueError("RemoteEnv: env options are set at construction (`options=`), not per reset")
        if self.session_id is None:
            r = self.client.create(self.env_id, seed=seed, options=self.env_options)
            self.session_id = r.session_id
        else:
            r = self.client.reset(self.session_id, seed=seed)
        return observation_to_dict(r.observation, self.decode_images), r.info

    def step(self, action: str):
        if self.session_id is None:
            raise RuntimeError("RemoteEnv: call reset() before step()")
        r = self.client.step(self.session_id, action)
        return observation_to_dict(r.observation, self.decode_images), r.reward, r.terminated, r.truncated, r.info

    def close(self) -> None:
        if self.session_id is not None:
            try:
                self.client.delete(self.session_id)
            finally:
                self.session_id = None
        if self._own_client:
            self.client.close()
        super().close()
