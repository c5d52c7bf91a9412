"""Thought / action spans from character offsets, on awkward outputs (tiny model's real tokenizer)."""

from __future__ import annotations

import pytest

from services.trainer.spans import find_action_key, split_spans


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model[1].tokenizer


def _split(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, split_spans(tok, ids)


def _check_boundary(tok, ids, sp, text):
    key = find_action_key(text)
    assert key is not None
    thought = tok.decode(ids[:sp.n_thought])
    assert len(thought) <= key and '"action"' not in thought[key:]
    # the first action token reaches past the key's start: the boundary is tight
    assert len(tok.decode(ids[:sp.n_thought + 1])) > key
    assert thought + tok.decode(ids[sp.n_thought:]) == text


def test_plain_answer(tok):
    text = '{"thoughts": "3 is less than 5, so I add one.", "action": "+"}'
    ids, sp = _split(tok, text)
    assert sp.has_action_key and sp.thought_ok and 0 < sp.n_thought < len(ids)
    assert sp.thought_text == "3 is less than 5, so I add one."
    _check_boundary(tok, ids, sp, text)


def test_no_action_key(tok):
    ids, sp = _split(tok, '{"thoughts": "I am not sure what to do"}')
    assert not sp.has_action_key and sp.n_thought == 0 and not sp.thought_ok and sp.n_tokens == len(ids)


def test_quotes_and_escaped_action_inside_thoughts(tok):
    text = '{"thoughts": "she said \\"action\\": \\"-\\" but \\"no\\"", "action": "-"}'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and '\\"action\\"' in sp.thought_text
    _check_boundary(tok, ids, sp, text)
    assert '"action": "-"}' in tok.decode(ids[sp.n_thought:])


def test_code_fence_and_prose(tok):
    text = 'Sure.\n```json\n{"thoughts": "go to cabinet 1", "action": "go to cabinet 1"}\n```'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and sp.thought_text == "go to cabinet 1"
    _check_boundary(tok, ids, sp, text)
    assert tok.decode(ids[sp.n_thought:]).rstrip().endswith("```")


def test_last_action_key_wins_and_action_first_has_no_thought(tok):
    text = '{"action": "+", "thoughts": "late"} {"thoughts": "again", "action": "-"}'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and sp.thought_text == "again"
    _check_boundary(tok, ids, sp, text)
    ids, sp = _split(tok, '{"action": "+", "thoughts": "after the action"}')
    assert sp.has_action_key and not sp.thought_ok  # nothing parseable before the key


def test_multibyte_characters_keep_offsets_monotone(tok):
    text = '{"thoughts": "déjà vu 🙂 → 24", "action": "="}<|im_end|>'
    ids, sp = _split(tok, text)
    assert sp.thought_ok and "🙂" in sp.thought_text
    assert tok.decode(ids[:sp.n_thought]).endswith('24", ') or '"action"' not in tok.decode(ids[:sp.n_thought])
    assert '"action"' in tok.decode(ids[sp.n_thought:])


def test_empty_thoughts_are_not_guided(tok):
    _, sp = _split(tok, '{"thoughts": "  ", "action": "+"}')
    assert sp.has_action_key and sp.n_thought > 0 and not sp.thought_ok
