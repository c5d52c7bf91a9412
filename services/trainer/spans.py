"""Thought and action spans of a sampled output, found from character offsets (DESIGN §4).

Thought tokens are the completion tokens before the last `"action"` key; action tokens are
the rest. Positions come from decoding prefixes of the sampled ids (so they hold for any
tokenizer), never from hard-coded token ids. An output without an `"action"` key has no
thought span: the whole output counts at full weight (its format penalty applies to all of it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

# The key, not an escaped quote inside a string value (`\"action\":` in the thoughts).
ACTION_KEY = re.compile(r'(?<!\\)"action"\s*:')
THOUGHTS_VALUE = re.compile(r'(?<!\\)"thoughts"\s*:\s*"((?:[^"\\]|\\.)*)"', re.S)


@dataclass
class Spans:
    n_thought: int
    """Tokens [0, n_thought) are thought tokens, [n_thought, n_tokens) action tokens."""
    n_tokens: int
    has_action_key: bool
    thought_ok: bool
    """A non-empty `"thoughts"` string lies inside the thought span: only then is it guided."""
    text: str
    thought_text: str = ""


def token_char_ends(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(decoded text, end character offset of each token in it), by decoding prefixes.

    Byte-level tokens can split a multi-byte character; a prefix then decodes with a
    replacement character, so ends are clamped to be monotone and within the text.
    """
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends, prev = [], 0
    for i in range(1, len(ids) + 1):
        n = len(tokenizer.decode(ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        prev = min(max(prev, n), len(text))
        ends.append(prev)
    if ends:
        ends[-1] = len(text)
    return text, ends


def find_action_key(text: str) -> int | None:
    """Character index where the last `"action"` key starts, or None."""
    last = None
    for m in ACTION_KEY.finditer(text):
        last = m.start()
    return last


def split_spans(tokenizer, ids: Sequence[int]) -> Spans:
    text, ends = token_char_ends(tokenizer, ids)
    key = find_action_key(text)
    if key is None:
        return Spans(0, len(ends), False, False, text)
    n_thought = sum(1 for e in ends if e <= key)
    found = THOUGHTS_VALUE.findall(text[:key])
    thought = found[-1] if found else ""  # the thoughts that belong to this action: the last before it
    return Spans(n_thought, len(ends), True, bool(thought.strip()) and n_thought > 0, text, thought)
