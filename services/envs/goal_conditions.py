"""The goal-condition rate of an ALFRED PDDL goal, computed from the current facts.

ALFWorld's text engine reports only won / not won. ALFRED's goal-condition success is the
fraction of the goal's conditions that hold; we compute it from the PDDL goal itself:

- the goal is a conjunction of blocks `(exists (?vars) (and literal ...))` (nesting allowed);
- *static* literals (types, object properties, where receptacles stand: nothing an action
  changes) only decide which objects a variable may stand for;
- the rate is the number of *fluent* literals (inReceptacle, isClean, isHot, isCool, holds,
  isToggled, atLocation, ...) that hold under the best choice of objects for the variables,
  each block maximised on its own, divided by the number of fluent literals in the goal.

So "put a clean mug in coffeemachine" is 0 at the start, 1/2 once the mug is clean, 1 when it
is clean and in the machine. Pure functions; no alfworld import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

STATIC_PREDICATES = {
    "objecttype", "receptacletype", "cancontain", "pickupable", "cleanable", "heatable", "coolable",
    "toggleable", "sliceable", "openable", "isreceptacleobject", "receptacleatlocation", "moveable",
}

Fact = tuple[str, tuple[str, ...]]


class GoalParseError(ValueError):
    pass


def _tokenize(text: str) -> list[str]:
    text = re.sub(r";[^\n]*", " ", text)  # PDDL comments
    return re.findall(r"\(|\)|[^\s()]+", text)


def _parse(tokens: list[str], pos: int = 0):
    if tokens[pos] != "(":
        return tokens[pos].lower(), pos + 1
    out, pos = [], pos + 1
    while pos < len(tokens) and tokens[pos] != ")":
        node, pos = _parse(tokens, pos)
        out.append(node)
    if pos >= len(tokens):
        raise GoalParseError("unbalanced parentheses")
    return out, pos + 1


def extract_goal(problem: str) -> list:
    """The s-expression under `(:goal ...)` of a PDDL problem."""
    tokens = _tokenize(problem)
    for i in range(len(tokens) - 1):
        if tokens[i] == "(" and tokens[i + 1].lower() == ":goal":
            node, _ = _parse(tokens, i)
            return node[1]
    raise GoalParseError("no (:goal ...) in the problem")


@dataclass
class Block:
    variables: dict[str, str] = field(default_factory=dict)  # ?name -> type
    static: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    fluent: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    distinct: list[tuple[str, str]] = field(default_factory=list)


def _typed_vars(node: list) -> dict[str, str]:
    out, pending = {}, []
    i = 0
    while i < len(node):
        tok = node[i]
        if tok == "-":
            for v in pending:
                out[v] = node[i + 1]
            pending, i = [], i + 2
            continue
        pending.append(tok.rstrip(","))
        i += 1
    for v in pending:
        out[v] = "object"
    return out


def _collect(node, block: Block) -> None:
    if not isinstance(node, list) or not node:
        return
    head = node[0]
    if head == "and":
        for child in node[1:]:
            _collect(child, block)
    elif head == "exists":
        block.variables.update(_typed_vars(node[1]))
        _collect(node[2], block)
    elif head == "not" and isinstance(node[1], list) and node[1] and node[1][0] == "=":
        block.distinct.append((node[1][1], node[1][2]))
    elif head == "not":
        raise GoalParseError("negated goal literals are not supported")
    else:
        lit = (head, tuple(node[1:]))
        (block.static if head in STATIC_PREDICATES else block.fluent).append(lit)


def goal_blocks(goal) -> list[Block]:
    """Split the goal's top-level conjunction into independently maximised blocks."""
    parts = goal[1:] if isinstance(goal, list) and goal and goal[0] == "and" else [goal]
    blocks = []
    for part in parts:
        b = Block()
        _collect(part, b)
        if b.fluent or b.static:
            blocks.append(b)
    return blocks


def _best(block: Block, facts: set[Fact], domain: dict[str, list[str]]) -> int:
    """Most fluent literals satisfiable together, over bindings that satisfy every static literal."""
    names = sorted(block.variables)
    best = -1

    def ground(args, env):
        return tuple(env.get(a, a) for a in args)

    def consistent(env) -> bool:
        for pred, args in block.static:
            if all(a in env or not a.startswith("?") for a in args) and (pred, ground(args, env)) not in facts:
                return False
        for a, b in block.distinct:
            if a in env and b in env and env[a] == env[b]:
                return False
        return True

    def rec(i: int, env: dict[str, str]) -> None:
        nonlocal best
        if i == len(names):
            score = sum((pred, ground(args, env)) in facts for pred, args in block.fluent)
            best = max(best, score)
            return
        var = names[i]
        for value in domain.get(block.variables[var], ()):
            env[var] = value
            if consistent(env):
                rec(i + 1, env)
            del env[var]

    rec(0, {})
    return max(best, 0)


class GoalConditions:
    """Built once per game from the PDDL problem; `rate(facts, domain)` after each step."""

    def __init__(self, problem: str):
        self.blocks = goal_blocks(extract_goal(problem))
        self.total = sum(len(b.fluent) for b in self.blocks)

    def satisfied(self, facts: set[Fact], domain: dict[str, list[str]]) -> int:
        return sum(_best(b, facts, domain) for b in self.blocks)

    def rate(self, facts: set[Fact], domain: dict[str, list[str]]) -> float:
        if self.total == 0:
            return 0.0
        return self.satisfied(facts, domain) / self.total
