"""What every env of the service is: a gymnasium-style state machine over the agent's text.

`reset(*, seed=None, options=None) -> (Obs, info)` and `step(output_text) -> StepResult`.
The action is the model's raw output; the env parses it (`services.envs.parsing`) and applies
its documented rule to anything unparseable or illegal. Randomness comes from `self.np_random`
only, so one seed gives one episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from gymnasium.utils import seeding
from PIL import Image

from services.envs.parsing import ParsedAnswer, format_answer, parse_answer

JSON_FORMAT_NOTE = 'Answer with one JSON object: {"thoughts": "...", "action": "..."}.'


class EnvOptionError(ValueError):
    """Unknown option or a bad option value (the service answers 422)."""


class EnvUnavailable(RuntimeError):
    """The env cannot run here (a missing extra, missing data); the message says what to install."""


class Obs:
    """What an env shows after a reset or step: plain data, no encoder (the service's `wire`
    module encodes). The image may be given drawn, or as `draw` (called on first access of
    `.image`), so that the service draws only frames whose PNG it has not cached by `image_key`."""

    __slots__ = ("text", "instruction", "admissible_actions", "image_key", "_image", "_draw")

    def __init__(self, text: str, instruction: str, image: Image.Image | None = None,
                 admissible_actions: list[str] | None = None, image_key: Hashable | None = None,
                 draw: Callable[[], Image.Image] | None = None):
        self.text = text
        self.instruction = instruction
        self.admissible_actions = admissible_actions
        self.image_key = image_key
        """Identifies the image's content (same key, same pixels), so its PNG can be reused."""
        self._image = image
        self._draw = draw

    @property
    def has_image(self) -> bool:
        return self._image is not None or self._draw is not None

    @property
    def image(self) -> Image.Image | None:
        if self._image is None and self._draw is not None:
            self._image, self._draw = self._draw(), None
        return self._image

    def __repr__(self) -> str:
        return f"Obs(text={self.text!r}, image={'yes' if self.has_image else 'no'}, image_key={self.image_key!r})"


@dataclass
class StepResult:
    observation: Obs
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)


class TextActionEnv:
    """Base class: option handling, seeding, parsing. Subclasses implement `_reset` and `_act`."""

    env_id: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}
    max_steps: ClassVar[int | None] = None
    image_shape: ClassVar[tuple[int, int, int] | None] = None
    """(height, width, 3) of every observation image; None for text-only envs."""
    lists_admissible_actions: ClassVar[bool] = False
    """Observations carry `admissible_actions` (otherwise it is None)."""
    fast: ClassVar[bool] = True
    """Steps take well under a millisecond (batched steps share workers)."""

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise EnvOptionError(f"{self.env_id}: unknown option(s) {unknown}; known: {sorted(self.default_options)}")
        self.options = {**self.default_options, **options}
        self._check_options()
        self.np_random, _ = seeding.np_random(None)
        self.done = True

    # -- to override -------------------------------------------------------------------------
    def _check_options(self) -> None:
        pass

    def actions(self) -> list[str] | None:
        """The fixed action vocabulary, or None where it depends on the state."""
        return None

    def _reset(self, options: dict[str, Any]) -> tuple[Obs, dict[str, Any]]:
        raise NotImplementedError

    def _act(self, parsed: ParsedAnswer) -> StepResult:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def prefetch(self) -> None:
        """Do ahead of time what makes the next unseeded reset slow (e.g. solving the next hand),
        into caches, without changing the env's state or its generator. The env service calls
        it while a worker is idle between requests; the default does nothing."""

    # -- gymnasium-style API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                # (gymnasium's seeding raises a plain Error here, which would fail the session)
                raise EnvOptionError(f"{self.env_id}: seed must be a non-negative integer, got {seed!r}")
            self.np_random, _ = seeding.np_random(seed)
        out = self._reset(options or {})
        self.done = False
        return out

    def step(self, output_text: str) -> StepResult:
        if self.done:
            raise EpisodeOver(f"{self.env_id}: the episode is over; reset the session first")
        result = self._act(parse_answer(output_text))
        self.done = result.terminated or result.truncated
        return result

    def rng_int(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] from the env's generator."""
        return int(self.np_random.integers(low, high + 1))

    # -- expert ----------------------------------------------------------------------------------
    def expert(self) -> tuple[str | None, str]:
        """(the expert's next action or None, a thought that explains it)."""
        return None, "no expert for this env"

    def answer_fields(self) -> dict[str, Any]:
        """Fields beside "thoughts" and "action" that this env's answer format asks for."""
        return {}

    def expert_info(self) -> dict[str, Any]:
        """The expert's step for the info of every observation: its action, its thoughts, and the
        whole answer in the format the instruction asks for (what SFT-init trains on, DESIGN §4)."""
        action, thoughts = self.expert()
        answer = None if action is None else format_answer(thoughts, action, **self.answer_fields())
        return {"expert_action": action, "expert_thoughts": thoughts, "expert_answer": answer}


class EpisodeOver(RuntimeError):
    """step() after the episode ended (the service answers 409)."""


def base_info(parsed: ParsedAnswer, action: str | None, valid: bool, won: bool = False, **extra: Any) -> dict[str, Any]:
    """The info fields every env carries (DESIGN §3.1)."""
    info = {"format_ok": parsed.format_ok, "action_valid": valid, "action": action, "won": won}
    if not parsed.format_ok:
        info["parse_error"] = parsed.error
    info.update(extra)
    return info
