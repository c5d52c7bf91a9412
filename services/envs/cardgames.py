"""Points24 and EZPoints: build a formula from the dealt cards, one token per step.

Faithful to RL4VLM's gym-cards (actions, rewards, the 300x300 green-felt image, the prompt),
with the defects of DESIGN §5.8 fixed. The differences, all listed in the README:
- seeded generator (`reset(seed=s)` deals the same hand), not Python's global `random`;
- tokens never concatenate ("2" then "4" is a syntax error, not 24);
- exact rational evaluation (8 / (3 - 8 / 3) is 24), unary minus is not a move;
- an over-used number, an unknown action or unparseable output costs -1 and leaves the formula
  unchanged (RL4VLM appended a blank or, on a parse failure, played a random action);
- the length limit counts every non-"=" step (valid or not); the step past the limit is
  truncated with -1 (RL4VLM checked `len(formula) > 20` before acting, one step later);
- option `solvable_only` deals only hands that have a solution.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, ClassVar

from services.envs import render
from services.envs.base import EnvOptionError, Obs, StepResult, TextActionEnv, base_info
from services.envs.formula import FormulaError, completion, evaluate, solve
from services.envs.parsing import ParsedAnswer

SUITS = ("H", "S", "D", "C")
PENALTY = -1.0
WIN_REWARD = 10.0


def card_name(rank: int, suit: str) -> str:
    return f"{render.rank_label(rank)}{suit}"


class CardFormulaEnv(TextActionEnv):
    """Shared mechanics: a hand of cards, a formula of tokens, '=' to evaluate."""

    image_shape = (render.SIZE, render.SIZE, 3)
    operators: ClassVar[tuple[str, ...]] = ("+", "-", "*", "/", "(", ")")
    n_cards: ClassVar[int] = 4

    # -- options ---------------------------------------------------------------------------------
    def _check_options(self) -> None:
        o = self.options
        for key in ("target", "max_formula_len"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise EnvOptionError(f"{self.env_id}: option {key!r} must be a positive integer")
        for key in ("face_cards_as_10", "solvable_only", "text_state", "ask_cards"):
            if key in o and not isinstance(o[key], bool):
                raise EnvOptionError(f"{self.env_id}: option {key!r} must be true or false")

    @property
    def target(self) -> int:
        return self.options["target"]

    @property
    def max_number(self) -> int:
        return 10 if self.options.get("face_cards_as_10", True) else 13

    def actions(self) -> list[str]:
        return [str(i) for i in range(1, self.max_number + 1)] + [*self.operators, "="]

    @property
    def arith_ops(self) -> tuple[str, ...]:
        return tuple(op for op in self.operators if op in "+-*/")

    def card_value(self, rank: int) -> int:
        return min(rank, 10) if self.options.get("face_cards_as_10", True) else rank

    # -- dealing -----------------------------------------------------------------------------------
    def _deal(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    def _reset(self, options: dict[str, Any]) -> tuple[Obs, dict[str, Any]]:
        unknown = set(options) - {"cards"}
        if unknown:
            raise EnvOptionError(f"{self.env_id}: reset option(s) {sorted(unknown)} unknown; the only one is 'cards' "
                                 "(other options are set when the session is created)")
        if "cards" in options:
            self.cards = self._parse_cards(options["cards"])
        else:
            for _ in range(1000):
                self.cards = self._deal()
                numbers = [self.card_value(r) for r, _ in self.cards]
                if not self.options.get("solvable_only") or solve(numbers, self.target, self.arith_ops):
                    break
            else:
                raise EnvOptionError(f"{self.env_id}: no solvable hand for target {self.target} in 1000 deals; "
                                     "turn solvable_only off or choose another target")
        self.numbers = [self.card_value(r) for r, _ in self.cards]
        self.formula: list[str] = []
        self.budget_used = 0  # non-"=" steps taken, valid or not
        self.steps = 0
        info = self._info(ParsedAnswer(True), None, True, event="reset")
        info["format_ok"] = True
        return self._obs(), info

    def prefetch(self) -> None:
        """Solve the hand the next unseeded reset will deal and encode its table, on a copy of the
        generator (a reset's cost is mostly these two; with `solvable_only`, the first deal)."""
        generator, self.np_random = self.np_random, copy.deepcopy(self.np_random)
        try:
            cards = self._deal()
        finally:
            self.np_random = generator
        completion([self.card_value(r) for r, _ in cards], self.target, (), self.arith_ops)
        render.prefetch_table(tuple(cards), self.target)

    def _parse_cards(self, cards: Any) -> list[tuple[int, str]]:
        """A hand given at reset, e.g. ["8H", "3S", "QD", "AC"] (rank A,2..10,J,Q,K then suit H/S/D/C)."""
        ranks = {"A": 1, "J": 11, "Q": 12, "K": 13, **{str(i): i for i in range(1, 14)}}
        if not isinstance(cards, list) or len(cards) != self.n_cards:
            raise EnvOptionError(f"{self.env_id}: reset option 'cards' must be a list of {self.n_cards} cards like '8H'")
        out = []
        for c in cards:
            if not isinstance(c, str) or len(c) < 2 or c[:-1].upper() not in ranks or c[-1].upper() not in SUITS:
                raise EnvOptionError(f"{self.env_id}: bad card {c!r}; write rank (A, 2-10, J, Q, K) then suit (H, S, D, C)")
            out.append((ranks[c[:-1].upper()], c[-1].upper()))
        return out

    # -- stepping ----------------------------------------------------------------------------------
    def _act(self, parsed: ParsedAnswer) -> StepResult:
        self.steps += 1
        action = parsed.action.strip() if parsed.format_ok else None
        if action == "=":
            return self._evaluate(parsed)
        known = action is not None and action in self.actions()
        self.budget_used += 1  # every non-"=" step, valid or not, uses one token of the budget
        if self.budget_used > self.options["max_formula_len"]:
            info = self._info(parsed, action if known else None, known,
                              event=f"truncated: more than {self.options['max_formula_len']} tokens")
            return StepResult(self._obs(), PENALTY, False, True, info)
        if action is None:
            return self._penalise(parsed, None, "unparseable output")
        if not known:
            return self._penalise(parsed, None, f"{action!r} is not an action")
        if action.isdigit():
            n = int(action)
            used = Counter(int(t) for t in self.formula if t.isdigit())
            if used[n] + 1 > self.numbers.count(n):
                why = "not dealt" if n not in self.numbers else "used more often than dealt"
                return self._penalise(parsed, None, f"number {n} {why}")
        self.formula.append(action)
        return StepResult(self._obs(), 0.0, False, False, self._info(parsed, action, True, event="appended"))

    def _penalise(self, parsed: ParsedAnswer, action: str | None, event: str) -> StepResult:
        return StepResult(self._obs(), PENALTY, False, False, self._info(parsed, action, False, event=event))

    def _evaluate(self, parsed: ParsedAnswer) -> StepResult:
        used = sorted(int(t) for t in self.formula if t.isdigit())
        won = False
        if used != sorted(self.numbers):
            event = "incomplete: not every card is used"
        else:
            try:
                value = evaluate(self.formula)
            except FormulaError as e:
                event = f"invalid formula: {e}"
            else:
                won = value == self.target
                event = "correct" if won else f"wrong: the formula equals {value}"
        info = self._info(parsed, "=", True, won=won, event=event)
        return StepResult(self._obs(), WIN_REWARD if won else PENALTY, True, False, info)

    # -- expert ------------------------------------------------------------------------------------
    def expert(self) -> tuple[str | None, str]:
        """(next action, a short thought) from a solver plan that extends the current formula."""
        shown = ", ".join(str(n) for n in self.numbers)
        plan = completion(self.numbers, self.target, self.formula, self.arith_ops)
        if plan is None:
            if solve(self.numbers, self.target, self.arith_ops) is None:
                return None, f"The cards count {shown}; no formula makes {self.target} with them."
            return None, f"The cards count {shown}; the current formula cannot be completed to {self.target}."
        text = " ".join(plan)
        if len(self.formula) >= len(plan):
            return "=", f"The cards count {shown}. The formula {text} uses every card and equals {self.target}, so I press '='."
        nxt = plan[len(self.formula)]
        return nxt, f"The cards count {shown}. {text} equals {self.target}, so next I append '{nxt}'."

    # -- observation -------------------------------------------------------------------------------
    def _info(self, parsed: ParsedAnswer, action: str | None, valid: bool, won: bool = False, event: str = "") -> dict:
        return base_info(
            parsed, action, valid, won,
            cards=[card_name(r, s) for r, s in self.cards], numbers=list(self.numbers),
            formula=" ".join(self.formula), formula_tokens=list(self.formula), target=self.target,
            tokens_left=max(0, self.options["max_formula_len"] - self.budget_used), event=event,
            **self.expert_info(),
        )

    def _formula_text(self) -> str:
        return " ".join(self.formula) if self.formula else "(empty)"

    def _obs(self) -> Obs:
        text = f"Current formula: {self._formula_text()}"
        if self.options.get("text_state"):
            text = f"Cards: {', '.join(card_name(r, s) for r, s in self.cards)}. " + text
        table, formula = (tuple(self.cards), self.target), tuple(self.formula)
        # Drawn only if asked for (the service's PNG cache may already hold this frame). Not a
        # closure over the Obs: that cycle would keep every drawn frame alive until the GC ran.
        return Obs(text=text, instruction=self.instruction(), image_key=(*table, formula),
                   draw=lambda: render.draw_formula(render.card_table(*table), list(formula)))

    def instruction(self) -> str:
        raise NotImplementedError


class Points24Env(CardFormulaEnv):
    env_id = "points24"
    description = ("RL4VLM's 24 points: four cards, build a formula equal to the target one token per step, "
                   "'=' to submit (+10 correct, -1 otherwise).")
    default_options = {"target": 24, "face_cards_as_10": True, "solvable_only": False, "max_formula_len": 20,
                       "text_state": False, "ask_cards": True}
    max_steps = 21

    def _deal(self) -> list[tuple[int, str]]:
        return [(self.rng_int(1, 13), SUITS[self.rng_int(0, 3)]) for _ in range(self.n_cards)]

    def answer_fields(self) -> dict[str, Any]:
        """The format with `ask_cards` asks for the card values and the formula so far."""
        if not self.options["ask_cards"]:
            return {}
        return {"cards": list(self.numbers), "formula": " ".join(self.formula)}

    def instruction(self) -> str:
        faces = ("Note that 'J', 'Q', and 'K' count as '10'" if self.options["face_cards_as_10"]
                 else "Note that 'A' counts as '1' and 'J', 'Q', and 'K' count as '11', '12', and '13'")
        seen = "You are observing these four cards in the image. "
        if self.options["text_state"]:
            seen = f"The four cards are {', '.join(card_name(r, s) for r, s in self.cards)}. "
        actions = ", ".join(f"'{a}'" for a in self.actions())
        fmt = ('{"cards": [x, y, z, w], "formula": "an partial formula", "thoughts": "{first check whether the '
               f'current formula equals {self.target}, then think about the next step}}", "action": "{{number or operator}}"}}'
               if self.options["ask_cards"] else '{"thoughts": "...", "action": "{number or operator}"}')
        return (f"You are an expert {self.target} points card game player. {seen}{faces}, and each card must be "
                f"used once. Your goal is to output a formula that evaluates to {self.target} using numbers from "
                f"the cards and operators such as '+', '-', '*', '/', '(', ')', and '='. "
                f"The current formula is: {self._formula_text()}. You can choose between [{actions}]; the number or "
                f"operator you choose is appended to the current formula, and '=' submits it. "
                f"Your response should be a valid json file in the following format: {fmt}")


class EZPointsEnv(CardFormulaEnv):
    env_id = "ezpoints"
    description = "RL4VLM's EZPoints: two cards, reach 12 with '+' and '*', '=' to submit (+10 correct, -1 otherwise)."
    operators = ("+", "*")
    n_cards = 2
    default_options = {"target": 12, "max_formula_len": 5, "text_state": False}
    max_steps = 6

    def _deal(self) -> list[tuple[int, str]]:
        # RL4VLM's deal: the first card 2..K; the second makes the target by '*' (half the time,
        # when the first divides it) or else by '+'; then the order is swapped half the time.
        t = self.target
        first = self.rng_int(2, 13)
        v = min(first, 10)
        if t % v == 0 and t // v <= 10 and self.np_random.random() <= 0.5:
            second = t // v
        else:
            second = t - v
        if not 1 <= second <= 10:  # only with a non-default target: fall back to a sum that fits
            v = self.rng_int(max(1, t - 10), min(10, t - 1)) if t >= 2 else 1
            first, second = v, t - v
        cards = [(first, SUITS[self.rng_int(0, 3)]), (second, SUITS[self.rng_int(0, 3)])]
        if self.np_random.random() <= 0.5:
            cards.reverse()
        return cards

    def _check_options(self) -> None:
        super()._check_options()
        if not 2 <= self.options["target"] <= 20:
            raise EnvOptionError("ezpoints: option 'target' must be between 2 and 20 (two cards of 1..10 reach it)")

    def instruction(self) -> str:
        seen = "the two cards in the image"
        if self.options["text_state"]:
            seen = "the cards " + " and ".join(card_name(r, s) for r, s in self.cards)
        return (f"You are playing ezpoints: reach {self.target} with {seen}, each used once; J, Q and K count as 10. "
                f"Current formula: {self._formula_text()}. Actions: 1 to 10, '+', '*', '='; each is appended to the "
                f'formula and \'=\' submits it. Answer with {{"thoughts": "...", "action": "..."}}.')
