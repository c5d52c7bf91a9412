"""Parse the agent's answer: a JSON object `{"thoughts": ..., "action": ...}` somewhere in its output.

Tolerant about the wrapping (prose before or after, ```json fences, a trailing comma-free object
inside a longer text), strict about the action: it must be a JSON string under the key
"action". Which strings are legal is each env's business (`canonical_action`); this module only
finds the object. No fallback ever guesses an action from loose text (DESIGN §5.5).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
MAX_OUTPUT_CHARS = 20_000
"""Longer outputs are not searched (a runaway generation is a format failure, not a slow request)."""


@dataclass
class ParsedAnswer:
    format_ok: bool
    """A JSON object with a string "action" was found."""
    action: str | None = None
    """The raw action string, as written (env-specific canonicalisation happens later)."""
    thoughts: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    """The whole object (Points24's "cards" and "formula" live here)."""
    error: str = ""
    span: tuple[int, int] | None = None
    """Character [start, end) in the text of the object the answer came from (format_ok only)."""
    action_key: int | None = None
    """Character index in the text where that object's top-level "action" key starts (the one
    json kept: the last). The trainer's thought/action split is at this index: one rule for both."""
    thoughts_key: int | None = None
    """Same for its top-level "thoughts" key (None when the object has none)."""


def _objects(text: str, lo: int = 0):
    """(object, start, end) for every JSON object that starts at some '{' of text[lo:], in order of position."""
    pos = text.find("{", lo)
    while pos != -1:
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            yield obj, pos, end
            pos = text.find("{", end)
        else:
            pos = text.find("{", pos + 1)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def top_level_keys(text: str, start: int, end: int) -> dict[str, int]:
    """Key -> character index of its last occurrence at the top level of the valid JSON object
    text[start:end] (json keeps the last of duplicate keys, so that is the one it read)."""
    keys: dict[str, int] = {}
    depth, i = 0, start
    while i < end:
        c = text[i]
        if c == '"':
            m = _STRING.match(text, i)
            j = m.end()
            if depth == 1:
                k = j
                while k < end and text[k] in " \t\r\n":
                    k += 1
                if k < end and text[k] == ":":
                    keys[json.loads(m.group(0))] = i
            i = j
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        i += 1
    return keys


def parse_answer(text: Any) -> ParsedAnswer:
    if not isinstance(text, str):
        return ParsedAnswer(False, error="output is not a string")
    if len(text) > MAX_OUTPUT_CHARS:
        return ParsedAnswer(False, error=f"output longer than {MAX_OUTPUT_CHARS} characters")
    # Fenced blocks first (a model that fences its JSON means that block), then the whole text.
    # Objects are searched in place (offsets into `text`) so the span they report is the text's.
    candidates = [(m.start(1), m.end(1)) for m in _FENCE.finditer(text)] + [(0, len(text))]
    seen_object = False
    for lo, hi in candidates:
        for obj, start, end in _objects(text[:hi] if hi < len(text) else text, lo):
            seen_object = True
            if "action" not in obj:
                continue
            action = obj["action"]
            if not isinstance(action, str):
                return ParsedAnswer(False, fields=obj, error=f'"action" must be a JSON string, got {type(action).__name__}')
            thoughts = obj.get("thoughts")
            keys = top_level_keys(text, start, end)
            return ParsedAnswer(True, action=action, thoughts=thoughts if isinstance(thoughts, str) else None, fields=obj,
                                span=(start, end), action_key=keys["action"], thoughts_key=keys.get("thoughts"))
    if seen_object:
        return ParsedAnswer(False, error='no JSON object with an "action" key')
    return ParsedAnswer(False, error="no JSON object found")


def format_answer(thoughts: str, action: str, **extra: Any) -> str:
    """The answer an ideal agent writes (used for expert demonstrations)."""
    return json.dumps({**extra, "thoughts": thoughts, "action": action}, ensure_ascii=False)
