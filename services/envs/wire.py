"""The env service's one encoder: domain results (Obs, StepResult, info dicts) to the JSON of the
shared schemas (`shared.schemas`: SessionResponse, ResetResponse, StepResponse, BatchStepResult).

It runs where the result is made (an env worker process, or the service process with `procs: 0`),
so the service sends the bytes as they come. The models are built with `model_construct` (no
re-validation of what our own code made) and serialised by pydantic-core: only declared fields
can reach the wire, and a test compares every route's output with its OpenAPI schema.

It also owns the PNG cache: encoding is most of a card-game step's cost, and images repeat (a
penalised action leaves the picture as it was, every hand starts from the same few frames).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from services.envs.base import Obs, StepResult
from services.envs.render import to_png_b64
from shared.schemas import BatchStepResult, ErrorResponse, Observation, ResetResponse, SessionResponse, StepResponse


class PngCache:
    """Base64 PNGs by the observation's `image_key` (same key, same pixels). Bounded (FIFO), thread-safe."""

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def encode(self, obs: Obs) -> str | None:
        if not obs.has_image:
            return None
        key = obs.image_key
        if key is None:
            return to_png_b64(obs.image)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self.hits += 1
                return found
        data = to_png_b64(obs.image)  # drawn here, on a miss only
        with self._lock:
            self.misses += 1
            self._items[key] = data
            if len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data


PNG_CACHE = PngCache()


def observation(obs: Obs) -> Observation:
    return Observation.model_construct(image=PNG_CACHE.encode(obs), text=obs.text, instruction=obs.instruction,
                                       admissible_actions=obs.admissible_actions)


def _reset(obs: Obs, info: dict[str, Any]) -> ResetResponse:
    return ResetResponse.model_construct(observation=observation(obs), info=info)


def session_json(session_id: str, obs: Obs, info: dict[str, Any]) -> bytes:
    return SessionResponse.model_construct(session_id=session_id, observation=observation(obs),
                                           info=info).model_dump_json().encode()


def reset_json(obs: Obs, info: dict[str, Any]) -> bytes:
    return _reset(obs, info).model_dump_json().encode()


def step_json(result: StepResult) -> bytes:
    return StepResponse.model_construct(observation=observation(result.observation), reward=float(result.reward),
                                        terminated=bool(result.terminated), truncated=bool(result.truncated),
                                        info=result.info).model_dump_json().encode()


def batch_item_json(session_id: str, result: StepResult, reset: tuple[Obs, dict[str, Any]] | None) -> bytes:
    """One element of a batch reply; `reset`: the next episode's start, when auto-reset made one."""
    return BatchStepResult.model_construct(
        session_id=session_id, observation=observation(result.observation), reward=float(result.reward),
        terminated=bool(result.terminated), truncated=bool(result.truncated), info=result.info, error=None,
        reset=None if reset is None else _reset(*reset)).model_dump_json().encode()


def batch_error_json(session_id: str, error: str, detail: str) -> bytes:
    """A batch element whose step failed: the error, no observation."""
    return BatchStepResult.model_construct(
        session_id=session_id, observation=None, reward=0.0, terminated=False, truncated=False, info={},
        error=ErrorResponse(error=error, detail=detail), reset=None).model_dump_json().encode()


def batch_json(items: list[bytes]) -> bytes:
    """The batch reply: a JSON array of elements each made by this module (in the workers, where
    the steps ran), joined without decoding them again."""
    return b"[" + b",".join(items) + b"]"
