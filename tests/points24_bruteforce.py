"""An independent Points24 solvability check for the solver's tests (not service code)."""

from __future__ import annotations

import itertools
from fractions import Fraction

from services.envs.formula import OPERATORS


def solvable_bruteforce(numbers, target: int, ops: tuple[str, ...] = OPERATORS) -> bool:
    """Independent check for tests: repeatedly replace two numbers by their combination."""
    vals = [Fraction(x) for x in numbers]

    def rec(vs: list[Fraction]) -> bool:
        if len(vs) == 1:
            return vs[0] == target
        for i, j in itertools.permutations(range(len(vs)), 2):
            rest = [v for k, v in enumerate(vs) if k not in (i, j)]
            a, b = vs[i], vs[j]
            for op in ops:
                if op == "/" and b == 0:
                    continue
                r = {"+": a + b, "-": a - b, "*": a * b}.get(op) if op != "/" else a / b
                if rec(rest + [r]):
                    return True
        return False

    return rec(vals)
