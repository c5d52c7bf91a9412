"""NumberLine (RL4VLM gym-cards): move the current number to the target with "+" and "-".

Rewards as in RL4VLM: +1 when the position reaches the target (the episode ends, won), -1 for
a move that does not get closer, 0 for one that does; truncated after 2 x max_position steps.
Fixed: a seeded generator (RL4VLM used the global `random`), the start never equals the target
(RL4VLM's reset could deal a finished game), and an unparseable or unknown action is -1 with
no move (RL4VLM played a random action).
"""

from __future__ import annotations

from typing import Any

from services.envs import render
from services.envs.base import EnvOptionError, Obs, StepResult, TextActionEnv, base_info
from services.envs.parsing import ParsedAnswer

PENALTY = -1.0


class NumberLineEnv(TextActionEnv):
    env_id = "numberline"
    description = "RL4VLM's NumberLine: move the current number to the target with '+' / '-' (+1 on reaching it)."
    default_options = {"max_position": 5, "text_state": False}
    max_steps = 10
    image_shape = (render.SIZE, render.SIZE, 3)

    def _check_options(self) -> None:
        m = self.options["max_position"]
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 100:
            raise EnvOptionError("numberline: option 'max_position' must be an integer in 1..100")
        if not isinstance(self.options["text_state"], bool):
            raise EnvOptionError("numberline: option 'text_state' must be true or false")

    def actions(self) -> list[str]:
        return ["-", "+"]

    @property
    def step_limit(self) -> int:
        return 2 * self.options["max_position"]

    def _reset(self, options: dict[str, Any]) -> tuple[Obs, dict[str, Any]]:
        if options:
            raise EnvOptionError("numberline: reset takes no options (set them when creating the session)")
        m = self.options["max_position"]
        self.position = self.rng_int(0, m)
        others = [p for p in range(m + 1) if p != self.position]
        self.goal = others[self.rng_int(0, len(others) - 1)]
        self.steps = 0
        return self._obs(), self._info(ParsedAnswer(True), None, True, event="reset")

    def _act(self, parsed: ParsedAnswer) -> StepResult:
        self.steps += 1
        action = parsed.action.strip() if parsed.format_ok else None
        valid = action in ("+", "-")
        before = abs(self.position - self.goal)
        if valid:
            self.position = min(self.options["max_position"], max(0, self.position + (1 if action == "+" else -1)))
        after = abs(self.position - self.goal)
        won = after == 0
        if not valid:
            reward, event = PENALTY, ("unparseable output" if action is None else f"{action!r} is not an action")
        elif won:
            reward, event = 1.0, "reached the target"
        elif after >= before:
            reward, event = PENALTY, "not closer to the target"
        else:
            reward, event = 0.0, "closer to the target"
        truncated = not won and self.steps >= self.step_limit
        info = self._info(parsed, action if valid else None, valid, won=won, event=event)
        return StepResult(self._obs(), reward, won, truncated, info)

    def expert(self) -> tuple[str | None, str]:
        p, g = self.position, self.goal
        if p == g:
            return None, f"The current number {p} is the target."
        if p < g:
            return "+", f"The current number is {p} and the target is {g}; {p} is less than {g}, so I add one."
        return "-", f"The current number is {p} and the target is {g}; {p} is greater than {g}, so I subtract one."

    def _info(self, parsed: ParsedAnswer, action: str | None, valid: bool, won: bool = False, event: str = "") -> dict:
        return base_info(parsed, action, valid, won, target=self.goal, current=self.position, event=event,
                         **self.expert_info())

    def instruction(self) -> str:
        state = "The image shows the target and the current position."
        if self.options["text_state"]:
            state = f"The target is {self.goal} and the current position is {self.position}."
        return (f"You are playing number line. {state} Move the current position to the target, one step at a "
                f'time. Answer with {{"thoughts": "...", "action": "+"}} or "-".')

    def _obs(self) -> Obs:
        goal, position, max_position = self.goal, self.position, self.options["max_position"]
        text = f"Target: {self.goal}. Current: {self.position}." if self.options["text_state"] else ""
        key = (self.env_id, self.goal, self.position, self.options["max_position"])
        return Obs(text=text, instruction=self.instruction(), image_key=key,
                   draw=lambda: render.number_line(goal, position, max_position))
