"""The chat the agent sees for an env observation: one function, so that the trainer's
rollouts, its teacher requests, `gtr eval` and `gtr sft` all build exactly the same prompt."""

from __future__ import annotations

from typing import Any

from shared.schemas import Observation


def observation_messages(obs: Observation | dict[str, Any]) -> list[dict[str, Any]]:
    """[{role: user, content: [image?, text]}] with the env's instruction (+ its observation text)."""
    if isinstance(obs, dict):
        obs = Observation.model_validate(obs)
    content: list[dict[str, Any]] = []
    if obs.image:
        content.append({"type": "image", "image": obs.image})
    text = obs.instruction
    if obs.text:
        text = f"{text}\n\n{obs.text}" if text else obs.text
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
