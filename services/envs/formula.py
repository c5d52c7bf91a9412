"""Formulas of the card games as token lists: exact evaluation and a solver. Pure functions.

Tokens are single actions ("3", "10", "+", "(", ...). They are never concatenated: "2" then
"4" is two numbers side by side, a syntax error, not 24 (DESIGN §5.8). Evaluation is exact
(`fractions.Fraction`), so 8 / (3 - 8 / 3) is exactly 24. Only binary operators exist: a
leading "-" is a syntax error, as in the card game (RL4VLM's `eval` accepted unary minus).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import lru_cache

OPERATORS = ("+", "-", "*", "/")
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class FormulaError(ValueError):
    """The formula does not parse, or divides by zero."""


def is_number(token: str) -> bool:
    return token.isdigit()


def evaluate(tokens: list[str] | tuple[str, ...]) -> Fraction:
    """Exact value of a token list: expr := term (('+'|'-') term)*, term := atom (('*'|'/') atom)*,
    atom := number | '(' expr ')'.

    Operator precedence with explicit stacks, not recursive descent: a legal formula may nest
    parentheses as deep as its length allows (`max_formula_len` is the client's to choose), and
    Python's recursion limit must not turn that into an env error."""
    if not tokens:
        raise FormulaError("empty formula")
    values: list[Fraction] = []
    ops: list[str] = []  # operators and open parentheses not applied yet

    def apply() -> None:
        op = ops.pop()
        rhs, lhs = values.pop(), values.pop()
        if op == "+":
            values.append(lhs + rhs)
        elif op == "-":
            values.append(lhs - rhs)
        elif op == "*":
            values.append(lhs * rhs)
        else:
            if rhs == 0:
                raise FormulaError("division by zero")
            values.append(lhs / rhs)

    expect_operand = True  # the grammar's state: an atom comes next, or an operator / ')'
    for i, tok in enumerate(tokens):
        if expect_operand:
            if tok == "(":
                ops.append(tok)
            elif is_number(tok):
                values.append(Fraction(int(tok)))
                expect_operand = False
            else:
                raise FormulaError(f"unexpected {tok!r}")
        elif tok == ")":
            while ops and ops[-1] != "(":
                apply()
            if not ops:
                raise FormulaError(f"unexpected {tok!r}")
            ops.pop()
        elif tok in PRECEDENCE:
            while ops and ops[-1] != "(" and PRECEDENCE[ops[-1]] >= PRECEDENCE[tok]:
                apply()
            ops.append(tok)
            expect_operand = True
        elif is_number(tok) or tok == "(":
            raise FormulaError(f"a number cannot follow {tokens[i - 1]!r} directly")
        else:
            raise FormulaError(f"unexpected {tok!r}")
    if expect_operand:
        raise FormulaError("formula ends too early")
    while ops:
        if ops[-1] == "(":
            raise FormulaError("unbalanced parentheses")
        apply()
    return values[0]


# ------------------------------------------------------------------------------------ solver
# Values are exact rationals as reduced (numerator, denominator) int pairs: ~5x faster than
# `Fraction` here, which matters because every new hand is solved once (the expert's plan).
# An expression is (value, tokens, precedence); precedence 3 for a bare number.

_gcd = math.gcd


def _q(n: int, d: int) -> tuple[int, int]:
    if d < 0:
        n, d = -n, -d
    g = _gcd(n, d)
    return (n // g, d // g) if g > 1 else (n, d)


def _apply(op: str, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    an, ad = a
    bn, bd = b
    if op == "+":
        return _q(an * bd + bn * ad, ad * bd)
    if op == "-":
        return _q(an * bd - bn * ad, ad * bd)
    if op == "*":
        return _q(an * bn, ad * bd)
    if bn == 0:
        return None
    return _q(an * bd, ad * bn)


def _wrap(tokens: tuple[str, ...]) -> tuple[str, ...]:
    return ("(", *tokens, ")")


def _combine(op: str, left, right):
    value = _apply(op, left[0], right[0])
    if value is None:
        return None
    _, lt, lp = left
    _, rt, rp = right
    p = PRECEDENCE[op]
    # Minimal parentheses: a looser left child, a looser right child, or an equally tight right
    # child under a non-associative operator (a - (b + c), a / (b * c)).
    lt = _wrap(lt) if lp < p else lt
    rt = _wrap(rt) if rp < p or (rp == p and op in "-/") else rt
    return value, (*lt, op, *rt), p


def _splits(mask: int):
    """Ordered (left, right) pairs of non-empty disjoint submasks covering `mask`."""
    sub = (mask - 1) & mask
    while sub:
        yield sub, mask ^ sub
        sub = (sub - 1) & mask


def _needed(op: str, left: tuple[int, int], target: tuple[int, int]) -> tuple[int, int] | None:
    """The right operand r with `left op r == target`, or None when there is none."""
    if op == "+":
        return _apply("-", target, left)
    if op == "-":
        return _apply("-", left, target)
    if op == "*":
        return _apply("/", target, left) if left[0] != 0 else None
    # left / r == target
    return _apply("/", left, target) if target[0] != 0 and left[0] != 0 else None


@lru_cache(maxsize=8192)
def solutions(numbers: tuple[int, ...], target: int, ops: tuple[str, ...] = OPERATORS) -> tuple[tuple[str, ...], ...]:
    """Every distinct formula (minimal parentheses) using each number once that equals `target`,
    shortest first. Cached per hand (sorted, so the order of the cards does not matter)."""
    nums = tuple(sorted(numbers))
    if nums != tuple(numbers):
        return solutions(nums, target, ops)
    n = len(nums)
    if n == 1:
        return ((str(nums[0]),),) if nums[0] == target else ()
    table: dict[int, list] = {}
    for i, x in enumerate(nums):
        table[1 << i] = [((x, 1), (str(x),), 3)]
    full_mask = (1 << n) - 1
    for size in range(2, n):
        for combo in itertools.combinations(range(n), size):
            mask = sum(1 << i for i in combo)
            out, seen = [], set()
            for sub, rest in _splits(mask):
                for left in table[sub]:
                    for right in table[rest]:
                        for op in ops:
                            e = _combine(op, left, right)
                            if e is not None and e[1] not in seen:
                                seen.add(e[1])
                                out.append(e)
            table[mask] = out
    # Top level: only pairs that hit the target, found by looking up the value the right side
    # needs (10x faster than building every full expression).
    goal = (target, 1)
    found = set()
    for sub, rest in _splits(full_mask):
        by_value: dict[tuple[int, int], list] = {}
        for right in table[rest]:
            by_value.setdefault(right[0], []).append(right)
        for left in table[sub]:
            for op in ops:
                need = _needed(op, left[0], goal)
                if need is None:
                    continue
                for right in by_value.get(need, ()):
                    e = _combine(op, left, right)
                    if e is not None and e[0] == goal:
                        found.add(e[1])
    return tuple(sorted(found, key=lambda t: (len(t), t)))


def solve(numbers, target: int, ops: tuple[str, ...] = OPERATORS) -> tuple[str, ...] | None:
    """One shortest formula for the hand, or None when there is none."""
    found = solutions(tuple(numbers), target, tuple(ops))
    return found[0] if found else None


def completion(numbers, target: int, prefix: list[str] | tuple[str, ...], ops: tuple[str, ...] = OPERATORS
               ) -> tuple[str, ...] | None:
    """A solution that starts with `prefix` (the formula typed so far), or None."""
    prefix = tuple(prefix)
    for sol in solutions(tuple(numbers), target, tuple(ops)):
        if sol[: len(prefix)] == prefix:
            return sol
    return None
