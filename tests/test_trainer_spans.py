"""Thought / action spans from character offsets, on awkward outputs (tiny model's real tokenizer).

The split is at the "action" key of the object the env's parser executes (one rule for both)."""

from __future__ import annotations

import pytest

from services.envs.parsing import parse_answer
from services.trainer.spans import decode_output, split_spans


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model[1].tokenizer


def _split(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, split_spans(tok, ids)


def _check_boundary(tok, ids, sp, text, key):
    """The split is at character `key` (where the executed "action" key starts), and tight."""
    assert text[key:key + 8] == '"action"' and sp.parsed.action_key == key
    thought = decode_output(tok, ids[:sp.n_thought])
    assert len(thought) <= key
    # the first action token reaches past the key's start: the boundary is tight
    assert len(decode_output(tok, ids[:sp.n_thought + 1])) > key
    assert thought + decode_output(tok, ids[sp.n_thought:]) == text


def test_plain_answer(tok):
    text = '{"thoughts": "3 is less than 5, so I add one.", "action": "+"}'
    ids, sp = _split(tok, text)
    assert sp.has_action_key and sp.thought_ok and 0 < sp.n_thought < len(ids)
    assert sp.thought_text == "3 is less than 5, so I add one."
    _check_boundary(tok, ids, sp, text, text.index('"action"'))


def test_quotes_and_escaped_action_inside_thoughts(tok):
    text = '{"thoughts": "she said \\"action\\": \\"-\\" but \\"no\\"", "action": "-"}'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and sp.thought_text == 'she said "action": "-" but "no"'  # decoded, as the env reads it
    _check_boundary(tok, ids, sp, text, text.rindex('"action"'))
    assert '"action": "-"}' in tok.decode(ids[sp.n_thought:])


def test_code_fence_and_prose(tok):
    text = 'Sure.\n```json\n{"thoughts": "go to cabinet 1", "action": "go to cabinet 1"}\n```'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and sp.thought_text == "go to cabinet 1"
    _check_boundary(tok, ids, sp, text, text.index('"action"'))
    assert tok.decode(ids[sp.n_thought:]).rstrip().endswith("```")


def test_the_executed_object_wins_not_the_last_action_key(tok):
    # The env executes the FIRST object with an "action": "+", not the later "-".
    text = '{"thoughts": "add", "action": "+"} {"thoughts": "again", "action": "-"}'
    ids, sp = _split(tok, text)
    assert parse_answer(text).action == "+"
    assert sp.thought_ok and sp.thought_text == "add"
    _check_boundary(tok, ids, sp, text, text.index('"action"'))
    assert decode_output(tok, ids[sp.n_thought:]).lstrip().startswith('"action": "+"}')


def test_a_nested_action_in_the_thoughts_stays_in_the_thought_span(tok):
    # A nested {"action": ...} inside the thoughts is not the executed key: the top-level one is.
    text = '{"thoughts": {"plan": {"action": "-"}, "why": "x"}, "action": "+"}'
    ids, sp = _split(tok, text)
    assert parse_answer(text).action == "+"
    _check_boundary(tok, ids, sp, text, text.rindex('"action"'))
    assert not sp.thought_ok  # thoughts is not a string: not guided, but the action is still split off
    text = '{"thoughts": "think", "action": "+", "extra": {"action": "-"}}'
    ids, sp = _split(tok, text)
    assert sp.thought_ok
    _check_boundary(tok, ids, sp, text, text.index('"action"'))


def test_action_first_has_no_guided_thought(tok):
    text = '{"action": "+", "thoughts": "after the action"}'
    ids, sp = _split(tok, text)
    assert sp.has_action_key and not sp.thought_ok and sp.thought_text == ""
    _check_boundary(tok, ids, sp, text, 1)


@pytest.mark.parametrize("text", ['{"thoughts": "truncated", "action": "+', '{"thoughts": "t", "action": 3}',
                                  '{"thoughts": "no action"}', "no json here"])
def test_outputs_the_env_rejects_have_no_thought_span(tok, text):
    ids, sp = _split(tok, text)
    assert not parse_answer(text).format_ok
    assert (sp.has_action_key, sp.thought_ok, sp.n_thought, sp.n_tokens) == (False, False, 0, len(ids))


def test_multibyte_characters_keep_offsets_monotone(tok):
    text = '{"thoughts": "déjà vu 🙂 → 24", "action": "="}<|im_end|>'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and "🙂" in sp.thought_text
    assert sp.text == text.removesuffix("<|im_end|>")  # as the env receives it
    _check_boundary(tok, ids, sp, sp.text, text.index('"action"'))


def test_empty_thoughts_are_not_guided(tok):
    _, sp = _split(tok, '{"thoughts": "  ", "action": "+"}')
    assert sp.has_action_key and sp.n_thought > 0 and not sp.thought_ok
