"""Experts for demonstrations (SFT-init, DESIGN §4): in process here, over HTTP through
`info["expert_action"]` / `info["expert_thoughts"]` / `info["expert_answer"]`, which every
observation carries (`TextActionEnv.expert_info`).

- Points24 / EZPoints: the exact solver (`formula.solutions`) plans a formula that extends the
  current one; the expert appends its next token, then '='. No plan (an unsolvable hand, or a
  formula that cannot be completed): no action (None).
- NumberLine: '+' or '-' towards the target.
- ALFWorld: alfworld's handcoded expert (`extra.expert_plan`), run with its own seeded generator.
"""

from __future__ import annotations

from services.envs.base import TextActionEnv


class NoExpertAction(RuntimeError):
    """The expert has no action in this state (e.g. an unsolvable Points24 hand)."""


def expert_demo(env: TextActionEnv) -> tuple[str, str]:
    """(thoughts, action) of the env's expert for the current state."""
    action, thoughts = env.expert()
    if action is None:
        raise NoExpertAction(f"{env.env_id}: no expert action here ({thoughts})")
    return thoughts, action


def expert_answer(env: TextActionEnv) -> str:
    """The full JSON answer an ideal agent writes, in the env's requested format."""
    expert_demo(env)  # raises when there is no action
    return env.expert_info()["expert_answer"]
