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


def _objects(text: str):
    """Every JSON object that starts at some '{' of `text`, in order of position."""
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            yield obj
            pos = text.find("{", end)
        else:
            pos = text.find("{", pos + 1)


def parse_answer(text: Any) -> ParsedAnswer:
    if not isinstance(text, str):
        return ParsedAnswer(False, error="output is not a string")
    if len(text) > MAX_OUTPUT_CHARS:
        return ParsedAnswer(False, error=f"output longer than {MAX_OUTPUT_CHARS} characters")
    # Fenced blocks first (a model that fences its JSON means that block), then the whole text.
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    seen_object = False
    for chunk in candidates:
        for obj in _objects(chunk):
            seen_object = True
            if "action" not in obj:
                continue
            action = obj["action"]
            if not isinstance(action, str):
                return ParsedAnswer(False, fields=obj, error=f'"action" must be a JSON string, got {type(action).__name__}')
            thoughts = obj.get("thoughts")
            return ParsedAnswer(True, action=action, thoughts=thoughts if isinstance(thoughts, str) else None, fields=obj)
    if seen_object:
        return ParsedAnswer(False, error='no JSON object with an "action" key')
    return ParsedAnswer(False, error="no JSON object found")


def format_answer(thoughts: str, action: str, **extra: Any) -> str:
    """The answer an ideal agent writes (used for expert demonstrations)."""
    return json.dumps({**extra, "thoughts": thoughts, "action": action}, ensure_ascii=False)
