"""Clients of the env service (DESIGN §3.1): a thin HTTP client, and a gymnasium `Env` that wraps
one remote session so that the service can be used like any gym env.

    from shared.env_client import EnvClient, RemoteEnv
    env = RemoteEnv("points24", base_url="http://127.0.0.1:8100")
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

from shared.client import ServiceClient, ServiceError
from shared.codecs import b64_to_image
from shared.schemas import (BatchStepResult, CreateSessionRequest, EnvList, EnvSpec, ResetRequest, ResetResponse,
                            SessionResponse, StepRequest, StepResponse)

DEFAULT_URL = "http://127.0.0.1:8100"

# Validates a batch reply straight from its bytes (one pass in pydantic-core, no dicts in between).
_BATCH_RESULTS = TypeAdapter(list[BatchStepResult])


class EnvClient:
    """Typed calls to the env service, on top of `ServiceClient` (timeouts, retries, errors).

    The retry policy is declared once per route in `RETRIES`: a step or a reset whose reply
    was lost may have been applied, and a second try would silently play it twice, so those
    are sent exactly once; reads and session creation (a duplicate session is harmless: it
    expires by the TTL) are retried.
    """

    RETRIES: dict[str, int | None] = {
        "envs": None,  # None: the client's default
        "create": None,
        "reset": 0,
        "step": 0,
        "step_batch": 0,
        "delete": 0,  # best effort: a session whose delete is lost expires by the TTL
    }

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 120.0, retries: int = 4,
                 token: str | None = None):
        self.base_url = base_url
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
        return self.http.get("/v1/envs", model=EnvList, retries=self.RETRIES["envs"])

    def spec(self, env_id: str) -> EnvSpec:
        """The env's spec from `/v1/envs`; a clear error for an unknown id."""
        specs = {s.env_id: s for s in self.envs().envs}
        if env_id not in specs:
            raise ValueError(f"the env service at {self.base_url} has no env {env_id!r}; it has {sorted(specs)}")
        return specs[env_id]

    def create(self, env_id: str, seed: int | None = None, options: dict[str, Any] | None = None,
               retries: int | None = None) -> SessionResponse:
        """`retries` overrides the route's policy (a replica pool fails over instead of waiting)."""
        body = CreateSessionRequest(env_id=env_id, seed=seed, options=options or {})
        r = self.RETRIES["create"] if retries is None else retries
        return self.http.post("/v1/sessions", body, model=SessionResponse, retries=r)

    def reset(self, session_id: str, seed: int | None = None) -> ResetResponse:
        return self.http.post(f"/v1/sessions/{session_id}/reset", ResetRequest(seed=seed), model=ResetResponse,
                              retries=self.RETRIES["reset"])

    def step(self, session_id: str, action: str) -> StepResponse:
        return self.http.post(f"/v1/sessions/{session_id}/step", StepRequest(action=action), model=StepResponse,
                              retries=self.RETRIES["step"])

    def step_batch(self, steps: list[tuple[str, str]], auto_reset: bool = False) -> list[BatchStepResult]:
        """One result per (session_id, action), in order; a failed step has `.error` set. With
        `auto_reset`, a finished episode restarts in the same call (its start in `.reset`)."""
        body = {"steps": [{"session_id": s, "action": a} for s, a in steps], "auto_reset": auto_reset}
        out = self.http.post("/v1/step", body, retries=self.RETRIES["step_batch"], adapter=_BATCH_RESULTS)
        if len(out) != len(steps):
            raise ServiceError("envs", "POST", "/v1/step", 200, f"{len(out)} results for {len(steps)} steps")
        return out

    def delete(self, session_id: str) -> None:
        self.http.delete(f"/v1/sessions/{session_id}", retries=self.RETRIES["delete"])


def observation_to_dict(obs, decode_image: bool = True, spec: EnvSpec | None = None) -> dict[str, Any]:
    """The observation as RemoteEnv returns it. With `spec`, only the keys its space declares:
    no `image` for a text-only env, no `admissible_actions` where the env does not list them."""
    image = obs.image
    if image is not None and decode_image:
        image = np.asarray(b64_to_image(image), dtype=np.uint8)
    out = {"image": image, "text": obs.text, "instruction": obs.instruction,
           "admissible_actions": obs.admissible_actions}
    if spec is None:
        return out
    if spec.observation.image_shape is None:
        del out["image"]
    if spec.observation.admissible_actions:
        out["admissible_actions"] = tuple(obs.admissible_actions or ())
    else:
        del out["admissible_actions"]
    return out


# Observation texts are the envs' own prose (ASCII); model outputs are free text.
_TEXT = dict(min_length=0, max_length=1_000_000, charset=string.printable)


def observation_space(spec: EnvSpec, decode_images: bool = True) -> spaces.Dict:
    """A space that every observation of the env lies in (gymnasium's checker verifies it)."""
    fields: dict[str, spaces.Space] = {"text": spaces.Text(**_TEXT), "instruction": spaces.Text(**_TEXT)}
    shape = spec.observation.image_shape
    if shape is not None:
        # Base64 PNG text when images are not decoded.
        fields["image"] = (spaces.Box(0, 255, shape=tuple(shape), dtype=np.uint8) if decode_images
                           else spaces.Text(min_length=1, max_length=50_000_000,
                                            charset=string.ascii_letters + string.digits + "+/="))
    if spec.observation.admissible_actions:
        fields["admissible_actions"] = spaces.Sequence(spaces.Text(**_TEXT))
    return spaces.Dict(fields)


class RemoteEnv(gym.Env):
    """A gymnasium env backed by one session of the env service.

    Observations are dicts whose keys the env's spec (`GET /v1/envs`) decides: `image` (HxWx3
    uint8; the base64 PNG when `decode_images=False`) for envs that draw one, `text`,
    `instruction`, and `admissible_actions` (a tuple of strings) for envs that list them. The
    action is the model's raw output text. The session is created on the first `reset` and
    deleted by `close`.
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
        self.env_spec = self.client.spec(env_id)
        # Model outputs are free text; the space documents that and is not used to filter them.
        self.action_space = spaces.Text(max_length=max_action_chars, charset=string.printable)
        self.observation_space = observation_space(self.env_spec, decode_images)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options:
            raise ValueError("RemoteEnv: env options are set at construction (`options=`), not per reset")
        if self.session_id is None:
            r = self.client.create(self.env_id, seed=seed, options=self.env_options)
            self.session_id = r.session_id
        else:
            r = self.client.reset(self.session_id, seed=seed)
        return observation_to_dict(r.observation, self.decode_images, self.env_spec), r.info

    def step(self, action: str):
        if self.session_id is None:
            raise RuntimeError("RemoteEnv: call reset() before step()")
        r = self.client.step(self.session_id, action)
        return observation_to_dict(r.observation, self.decode_images, self.env_spec), r.reward, r.terminated, r.truncated, r.info

    def close(self) -> None:
        if self.session_id is not None:
            try:
                self.client.delete(self.session_id)
            finally:
                self.session_id = None
        if self._own_client:
            self.client.close()
        super().close()
