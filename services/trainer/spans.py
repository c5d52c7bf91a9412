"""Thought and action spans of a sampled output, found from character offsets (DESIGN §4).

The split uses the env's own parser (`services.envs.parsing.parse_answer`: one parsing rule
for both sides): thought tokens are the completion tokens before the top-level `"action"` key
of the JSON object the env executed; action tokens are the rest. With two objects, or an
`{"action": ...}` nested in the thoughts, the executed action is never in the thought span.
Positions come from decoding prefixes of the sampled ids (so they hold for any tokenizer),
never from hard-coded token ids. An output the parser rejects (no object with a string
`"action"`) has no thought span: the whole output counts at full weight and gets no KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from services.envs.parsing import ParsedAnswer, parse_answer


@dataclass
class Spans:
    n_thought: int
    """Tokens [0, n_thought) are thought tokens, [n_thought, n_tokens) action tokens."""
    n_tokens: int
    has_action_key: bool
    """The env's parser found an object with a string "action" (the env executes it: format_ok)."""
    thought_ok: bool
    """That object has a non-empty "thoughts" string before its "action" key: only then is it guided."""
    text: str
    """The output text as the env receives it (`decode_output`)."""
    thought_text: str = ""
    parsed: ParsedAnswer | None = None


def decode_output(tokenizer, ids: Sequence[int]) -> str:
    """The text of sampled ids as the env receives it (special tokens dropped). The rollout
    sends exactly this and the split parses exactly this, so both read the same object."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_char_ends(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(`decode_output` text, end character offset of each token in it), by decoding prefixes.

    Byte-level tokens can split a multi-byte character; a prefix then decodes with a
    replacement character, so ends are clamped to be monotone and within the text. Special
    tokens decode to nothing: their end is the previous token's.
    """
    ids = list(ids)
    text = decode_output(tokenizer, ids)
    ends, prev = [], 0
    for i in range(1, len(ids) + 1):
        n = len(decode_output(tokenizer, ids[:i]))
        prev = min(max(prev, n), len(text))
        ends.append(prev)
    if ends:
        ends[-1] = len(text)
    return text, ends


def split_spans(tokenizer, ids: Sequence[int]) -> Spans:
    text, ends = token_char_ends(tokenizer, ids)
    parsed = parse_answer(text)
    if not parsed.format_ok or parsed.action_key is None:
        return Spans(0, len(ends), False, False, text, parsed=parsed)
    key = parsed.action_key
    n_thought = sum(1 for e in ends if e <= key)
    thought = parsed.thoughts or ""
    before = parsed.thoughts_key is not None and parsed.thoughts_key < key
    return Spans(n_thought, len(ends), True, bool(thought.strip()) and before and n_thought > 0, text,
                 thought if before else "", parsed)
