"""The card games and NumberLine in process: rules one by one, seeds, the solver, the parser."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from services.envs.base import EnvOptionError, EpisodeOver
from services.envs.cardgames import EZPointsEnv, Points24Env
from services.envs.experts import NoExpertAction, expert_answer, expert_demo
from services.envs.formula import FormulaError, evaluate, solutions, solve
from services.envs.numberline import NumberLineEnv
from services.envs.parsing import parse_answer
from services.envs.registry import ENVS
from tests.points24_bruteforce import solvable_bruteforce


def act(a: str, **extra) -> str:
    return json.dumps({"thoughts": "t", **extra, "action": a})


def play(env, tokens):
    results = [env.step(act(t)) for t in tokens]
    return results[-1], results


def p24(cards, **options):
    env = Points24Env(**options)
    env.reset(options={"cards": cards})
    return env


# ------------------------------------------------------------------------------ Points24 rules


def test_correct_formula_wins_ten():
    env = p24(["8H", "3S", "8D", "3C"])
    last, steps = play(env, "8 / ( 3 - 8 / 3 ) =".split())  # exact: float arithmetic gets 23.99...
    assert [r.reward for r in steps[:-1]] == [0.0] * 9
    assert last.reward == 10.0 and last.terminated and not last.truncated
    assert last.info["won"] and last.info["event"] == "correct" and last.info["action"] == "="


def test_equals_with_an_unused_card_is_minus_one():
    env = p24(["6H", "4S", "KD", "AC"])  # 6 * 4 = 24 but 10 and 1 are left over
    last, _ = play(env, "6 * 4 =".split())
    assert last.reward == -1.0 and last.terminated and not last.info["won"]
    assert "not every card" in last.info["event"]


def test_wrong_value_is_minus_one():
    env = p24(["6H", "4S", "KD", "AC"])
    last, _ = play(env, "6 + 4 + 10 + 1 =".split())
    assert last.reward == -1.0 and last.terminated and "equals 21" in last.info["event"]


def test_overused_number_is_minus_one_and_not_appended():
    env = p24(["6H", "4S", "KD", "AC"])
    r = env.step(act("6"))
    assert r.reward == 0.0
    env.step(act("*"))
    r = env.step(act("6"))  # only one 6 was dealt
    assert r.reward == -1.0 and not r.terminated and not r.info["action_valid"] and r.info["action"] is None
    assert r.info["formula"] == "6 *" and "more often than dealt" in r.info["event"]
    r = env.step(act("7"))  # never dealt
    assert r.reward == -1.0 and "not dealt" in r.info["event"]
    assert r.info["formula"] == "6 *"


def test_face_cards_count_ten_or_their_rank():
    assert p24(["JH", "QS", "KD", "AC"]).numbers == [10, 10, 10, 1]
    env = p24(["JH", "QS", "KD", "AC"], face_cards_as_10=False)
    assert env.numbers == [11, 12, 13, 1] and "13" in env.actions()
    last, _ = play(env, "12 * ( 13 - 11 ) * 1 =".split())
    assert last.reward == 10.0


def test_truncation_past_twenty_tokens():
    env = p24(["6H", "4S", "KD", "AC"])
    tokens = ["("] * 20
    _, steps = play(env, tokens)
    assert all(r.reward == 0.0 and not r.truncated for r in steps)
    r = env.step(act("("))  # the 21st token
    assert r.truncated and not r.terminated and r.reward == -1.0
    with pytest.raises(EpisodeOver):
        env.step(act("="))


def test_invalid_steps_count_towards_the_limit():
    env = p24(["6H", "4S", "KD", "AC"])
    _, steps = play(env, ["9"] * 20)  # 9 is not in the hand: 20 penalties
    assert [r.reward for r in steps] == [-1.0] * 20 and not steps[-1].truncated
    assert env.step(act("garbage")).truncated


def test_division_by_zero_is_an_invalid_formula():
    env = p24(["6H", "4S", "4D", "AC"])
    last, _ = play(env, "6 / ( 4 - 4 ) * 1 =".split())
    assert last.reward == -1.0 and last.terminated and "division by zero" in last.info["event"]


def test_digits_never_concatenate():
    env = p24(["2H", "4S", "KD", "KC"])  # "2" "4" must not read as 24
    last, _ = play(env, "2 4 * 10 / 10 =".split())
    assert last.reward == -1.0 and "invalid formula" in last.info["event"]
    with pytest.raises(FormulaError):
        evaluate(["2", "4"])


def test_unary_minus_is_not_a_move():
    with pytest.raises(FormulaError):
        evaluate(["-", "3", "+", "27"])


def _random_formula(rng: random.Random, depth: int = 0) -> list[str]:
    if depth > 3 or rng.random() < 0.3:
        return [str(rng.randint(0, 12))]
    if rng.random() < 0.25:
        return ["(", *_random_formula(rng, depth + 1), ")"]
    return [*_random_formula(rng, depth + 1), rng.choice("+-*/"), *_random_formula(rng, depth + 1)]


def test_evaluate_agrees_with_python_and_refuses_garbage():
    """Precedence, associativity and parentheses as Python's own parser reads them (exact Fractions)."""
    from fractions import Fraction

    rng = random.Random(0)
    for _ in range(2000):
        tokens = _random_formula(rng)
        try:
            expected = eval(" ".join(f"Fraction({t})" if t.isdigit() else t for t in tokens), {"Fraction": Fraction})
        except ZeroDivisionError:
            with pytest.raises(FormulaError, match="division by zero"):
                evaluate(tokens)
            continue
        assert evaluate(tokens) == expected, tokens
    vocab = [str(i) for i in range(1, 11)] + list("+-*/()")
    for _ in range(3000):  # any token soup: a value or FormulaError, nothing else
        tokens = [rng.choice(vocab) for _ in range(rng.randint(1, 9))]
        try:
            evaluate(tokens)
        except FormulaError:
            pass
    for bad in (["(", ")"], ["3", ")"], ["(", "3"], ["3", "+"], ["3", "(", "3", ")"], [")", "3"]):
        with pytest.raises(FormulaError):
            evaluate(bad)


def test_a_formula_nested_1500_deep_is_evaluated_not_an_env_error():
    """A legal formula of 1,500 nested parentheses (issue 11.7): recursive descent hit Python's
    recursion limit and failed the session."""
    deep = ["("] * 1500 + "8 / ( 3 - 8 / 3 )".split() + [")"] * 1500
    assert evaluate(deep) == 24
    env = p24(["8H", "3S", "8D", "3C"], max_formula_len=len(deep))
    last, steps = play(env, [*deep, "="])
    assert last.reward == 10.0 and last.info["won"] and all(r.reward == 0.0 for r in steps[:-1])


def test_unparseable_or_unknown_action_is_penalised_never_random():
    env = p24(["6H", "4S", "KD", "AC"])
    for output in ["I think 6", '{"action": 6}', '{"thoughts": "x"}', act("six"), act("6 *"), ""]:
        r = env.step(output)
        assert r.reward == -1.0 and not r.info["action_valid"] and r.info["action"] is None
        assert r.info["formula"] == ""  # nothing was played
    r = env.step("```json\n" + act("6") + "\n```")
    assert r.info["format_ok"] and r.info["action"] == "6" and r.info["formula"] == "6"


def test_points24_image_and_instruction():
    env = Points24Env()
    obs, info = env.reset(seed=1)
    img = np.asarray(obs.image.convert("RGB"))
    assert img.shape == (300, 300, 3)
    assert tuple(img[5, 5]) == (53, 101, 77)  # green felt
    assert (img > 230).all(axis=-1).sum() > 5000  # four white card faces
    before = img.copy()
    r = env.step(act(str(info["numbers"][0])))
    after = np.asarray(r.observation.image.convert("RGB"))
    assert (after[:220] == before[:220]).all() and (after[220:] != before[220:]).any()  # only the formula changed
    assert '"action"' in obs.instruction and '"thoughts"' in obs.instruction and "24" in obs.instruction
    assert "cards" in obs.instruction  # the paper's prompt also asks for the cards and formula
    assert "The current formula is: (empty)" in obs.instruction


def test_seeds_reproduce_hands_and_episodes():
    def run(seed):
        env = Points24Env()
        obs, info = env.reset(seed=seed)
        out = [(info["cards"], obs.image.tobytes())]
        for a in ["1", "+", "=", ]:
            r = env.step(act(a))
            out.append((r.reward, r.info["formula"], r.observation.image.tobytes()))
        return out

    assert run(7) == run(7)
    hands = {tuple(Points24Env().reset(seed=s)[1]["cards"]) for s in range(20)}
    assert len(hands) > 15
    env = Points24Env()
    first = env.reset(seed=3)[1]["cards"]
    second = env.reset()[1]["cards"]  # no seed: the generator goes on
    assert env.reset(seed=3)[1]["cards"] == first and first != second


def test_solvable_only_deals_solvable_hands():
    for s in range(30):
        env = Points24Env(solvable_only=True)
        info = env.reset(seed=s)[1]
        assert solvable_bruteforce(info["numbers"], 24)
        assert info["expert_action"] is not None


def test_a_negative_seed_is_an_option_error_and_the_env_goes_on():
    env = Points24Env()
    env.reset(seed=3)
    with pytest.raises(EnvOptionError, match="non-negative"):
        env.reset(seed=-1)
    assert env.step(act("(")).info["formula"] == "("


def test_options_are_validated():
    with pytest.raises(EnvOptionError):
        Points24Env(bogus=1)
    with pytest.raises(EnvOptionError):
        Points24Env(target="24")
    with pytest.raises(EnvOptionError):
        Points24Env().reset(options={"cards": ["8H"]})


# ---------------------------------------------------------------------------------------- solver


def test_solver_agrees_with_bruteforce_on_random_hands():
    rng = random.Random(0)
    hands = [tuple(min(rng.randint(1, 13), 10) for _ in range(4)) for _ in range(150)]
    for hand in hands:
        found = solve(hand, 24)
        assert (found is not None) == solvable_bruteforce(hand, 24), hand
        if found is not None:
            assert evaluate(found) == 24
            assert sorted(int(t) for t in found if t.isdigit()) == sorted(hand)


def test_solver_finds_the_hard_ones():
    assert evaluate(solve((3, 3, 8, 8), 24)) == 24  # 8 / (3 - 8 / 3)
    assert evaluate(solve((1, 5, 5, 5), 24)) == 24  # 5 * (5 - 1 / 5)
    assert solve((1, 1, 1, 1), 24) is None
    assert all(evaluate(s) == 24 for s in solutions((4, 4, 10, 10), 24))


def test_expert_wins_every_solvable_hand():
    wins = 0
    for s in range(40):
        env = Points24Env(solvable_only=True)
        env.reset(seed=s)
        while not env.done:
            r = env.step(expert_answer(env))
        wins += r.info["won"]
    assert wins == 40


def test_expert_answer_in_the_info_follows_the_instruction():
    """The env formats the expert's answer itself (SFT-init trains on it without knowing formats)."""
    env = p24(["8H", "3S", "QD", "3C"])
    env.step(act("8"))
    answer = json.loads(env.step(act("/")).info["expert_answer"])
    assert answer["cards"] == [8, 3, 10, 3] and answer["formula"] == "8 /" and answer["action"]
    assert '"cards"' in env.instruction()
    env = p24(["8H", "3S", "QD", "3C"], ask_cards=False)
    answer = json.loads(env.reset(options={"cards": ["8H", "3S", "8D", "3C"]})[1]["expert_answer"])
    assert set(answer) == {"thoughts", "action"} and '"cards"' not in env.instruction()


def test_expert_has_no_action_on_unsolvable_hand():
    env = p24(["AH", "AS", "AD", "AC"])
    assert env.expert()[0] is None
    assert env.reset(options={"cards": ["AH", "AS", "AD", "AC"]})[1]["expert_answer"] is None
    with pytest.raises(NoExpertAction):
        expert_demo(env)


def test_expert_recovers_after_a_penalised_step():
    env = p24(["8H", "3S", "8D", "3C"])
    env.step(act("9"))  # not dealt: penalised, formula unchanged
    while not env.done:
        r = env.step(expert_answer(env))
    assert r.reward == 10.0


# ------------------------------------------------------------------------------------- EZPoints


def test_ezpoints_rules_and_expert():
    env = EZPointsEnv()
    obs, info = env.reset(seed=0)
    assert len(info["cards"]) == 2 and "12" in obs.instruction and len(obs.instruction) < 400
    for s in range(30):
        info = env.reset(seed=s)[1]
        assert solve(info["numbers"], 12, ("+", "*")) is not None  # RL4VLM's deal is always solvable
        while not env.done:
            thoughts, action = expert_demo(env)
            r = env.step(act(action))
        assert r.reward == 10.0
    env.reset(options={"cards": ["5H", "7S"]})
    assert env.step(act("-")).reward == -1.0  # not an EZPoints action
    last, _ = play(env, "5 * 7 =".split())
    assert last.reward == -1.0
    env.reset(options={"cards": ["5H", "7S"]})
    _, steps = play(env, ["5", "+", "+", "+", "+"])
    assert env.step(act("7")).truncated  # the sixth token


# ------------------------------------------------------------------------------------ NumberLine


def test_numberline_rewards_and_truncation():
    env = NumberLineEnv()
    obs, info = env.reset(seed=0)
    assert info["target"] != info["current"]
    assert np.asarray(obs.image.convert("RGB")).shape == (300, 300, 3)
    away = "-" if info["target"] > info["current"] else "+"
    r = env.step(act(away))
    assert r.reward == -1.0 or r.info["current"] == info["current"]  # moving away (or at the edge) costs 1
    r = env.step(act("x"))
    assert r.reward == -1.0 and not r.info["action_valid"]
    while not env.done:
        _, a = expert_demo(env)
        r = env.step(act(a))
    assert r.terminated and r.reward == 1.0 and r.info["won"]
    env = NumberLineEnv(max_position=3)
    env.reset(seed=1)
    results = [env.step(act("junk")) for _ in range(6)]
    assert results[-1].truncated and not any(r.truncated for r in results[:-1])


def test_numberline_text_state_and_images_differ_by_state():
    env = NumberLineEnv(text_state=True)
    obs, info = env.reset(seed=2)
    assert f"target is {info['target']}" in obs.instruction
    imgs = {NumberLineEnv().reset(seed=s)[0].image.tobytes() for s in range(10)}
    assert len(imgs) > 3


# ----------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("text,action", [
    ('{"thoughts": "a", "action": "+"}', "+"),
    ('Sure! Here it is:\n```json\n{"thoughts": "x {y}", "action": "10"}\n```\nDone.', "10"),
    ('prefix {"cards": [1, 2], "formula": "1 +", "thoughts": "t", "action": "="} suffix', "="),
    ('{"note": 1} and then {"action": "go to cabinet 1"}', "go to cabinet 1"),
])
def test_parser_tolerates_wrapping(text, action):
    p = parse_answer(text)
    assert p.format_ok and p.action == action


@pytest.mark.parametrize("text", ['', 'action: +', '{"action": 5}', '{"action": ["+"]}', '{"thoughts": "t"}',
                                  "{'action': '+'}", '{"action": "+"', None, "x" * 30_000])
def test_parser_is_strict_about_the_action(text):
    assert not parse_answer(text).format_ok


def test_every_game_is_deterministic_per_seed():
    for env_id in ("points24", "ezpoints", "numberline"):
        def run():
            env = ENVS[env_id]()
            obs, info = env.reset(seed=11)
            trace = [info, obs.instruction]
            for a in itertools.islice(itertools.cycle(env.actions()), 5):
                if env.done:
                    break
                r = env.step(act(a))
                trace.append((r.reward, r.terminated, r.truncated, r.info, r.observation.image.tobytes()))
            return trace

        assert run() == run(), env_id


@pytest.mark.parametrize("cls", [Points24Env, EZPointsEnv])
def test_prefetch_prepares_the_next_hand_without_changing_the_game(cls):
    from services.envs import render
    from services.envs.formula import solutions

    a, b = cls(), cls()
    a.reset(seed=5)
    b.reset(seed=5)
    for _ in range(3):
        a.prefetch()  # twice in a row: still the same next hand
        a.prefetch()
        solved, drawn = solutions.cache_info().misses, render._card_table_p.cache_info().misses
        obs_a, info_a = a.reset()
        obs_a.image  # the first frame
        assert solutions.cache_info().misses == solved  # the reset found its hand solved
        assert render._card_table_p.cache_info().misses == drawn  # and its table drawn
        assert info_a == b.reset()[1]  # the same hand, expert and all, as without prefetching


REQUIRED_INFO = {"format_ok", "action_valid", "action", "won", "expert_action", "expert_thoughts", "expert_answer",
                 "event"}


@pytest.mark.parametrize("env_id", [e for e in ENVS if e != "alfworld-thor"])
def test_every_env_keeps_the_contract(env_id):
    """A check_env for our text-action envs: the instruction states the JSON format, every info
    carries the DESIGN §3.1 fields, garbage is penalised, the expert's action is legal."""
    from services.envs.alfworld_env import alfworld_status

    if env_id == "alfworld" and not alfworld_status()[0]:
        pytest.skip(alfworld_status()[1])
    env = ENVS[env_id]()
    obs, info = env.reset(seed=0)
    assert '"thoughts"' in obs.instruction and '"action"' in obs.instruction
    assert REQUIRED_INFO <= set(info)
    assert obs.image is None or obs.image.size == (300, 300)
    r = env.step("no json here")
    assert REQUIRED_INFO <= set(r.info) and r.reward < 0 and not r.info["format_ok"] and r.info["action"] is None
    action = r.info["expert_action"]
    if action is not None:  # the formatted answer says the same, in the instruction's format
        parsed = parse_answer(r.info["expert_answer"])
        assert parsed.action == action and parsed.thoughts == r.info["expert_thoughts"]
        legal = obs.admissible_actions if obs.admissible_actions is not None else env.actions()
        assert action in (r.observation.admissible_actions or legal)
        r = env.step(act(action))
        assert r.info["format_ok"] and r.info["action_valid"] and r.info["action"] == action
    env.close()
