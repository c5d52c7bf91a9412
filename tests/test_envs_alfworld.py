"""ALFWorld's text engine with the bundled hand-authored games (skipped without the extra)."""

from __future__ import annotations

import json

import pytest

from services.envs.alfworld_env import INSTALL_HINT, alfworld_status, bundled_game_names
from services.envs.goal_conditions import GoalConditions

ok, why = alfworld_status()
pytestmark = [pytest.mark.alfworld, pytest.mark.skipif(not ok, reason=f"{why} ({INSTALL_HINT})")]


def act(a: str) -> str:
    return json.dumps({"thoughts": "t", "action": a})


def make(game):
    from services.envs.alfworld_env import AlfWorldEnv

    return AlfWorldEnv(game=game)


def test_bundled_games_cover_every_task_type():
    from services.envs.alfworld_env import bundled_games_dir

    types = {json.loads((bundled_games_dir() / n / "traj_data.json").read_text())["task_type"]
             for n in bundled_game_names()}
    assert types == {"pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                     "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"}


@pytest.mark.parametrize("game", bundled_game_names())
def test_expert_wins_every_bundled_game_with_rising_goal_conditions(game):
    env = make(game)
    obs, info = env.reset(seed=0)
    assert obs.admissible_actions and all(a in obs.instruction for a in obs.admissible_actions)
    assert info["task"] and info["task"] in obs.instruction and '"action"' in obs.instruction
    rates, rewards = [info["goal_condition_rate"]], []
    while not env.done:
        r = env.step(act(info["expert_action"]))
        info = r.info
        assert info["action_valid"]
        rates.append(info["goal_condition_rate"])
        rewards.append(r.reward)
    env.close()
    assert info["won"] and r.terminated and not r.truncated
    assert rates[-1] == 1.0 and rates[0] < 1.0
    assert max(rates[: len(rates) // 2 + 1]) < 1.0  # it rises over the episode, not at once
    assert rewards[-1] == pytest.approx(50 + 1.0)  # 50 x won + goal-condition rate
    assert all(r == pytest.approx(x) for r, x in zip(rewards[:-1], rates[1:-1]))


def test_actions_match_exactly_never_by_substring():
    env = make("pick_apple_countertop")  # eleven cabinets
    obs, _ = env.reset(seed=0)
    assert "go to cabinet 1" in obs.admissible_actions and "go to cabinet 10" in obs.admissible_actions
    r = env.step(act("go to cabinet"))  # a prefix of several commands: not an action
    assert not r.info["action_valid"] and r.observation.text == "Nothing happens." and r.reward == pytest.approx(-1.0)
    r = env.step(act("GO TO  Cabinet 1"))  # case and spacing are normalised, nothing else
    assert r.info["action"] == "go to cabinet 1" and "cabinet 1." in r.observation.text
    assert "cabinet 10" not in r.observation.text
    r = env.step(act("go to cabinet 10 please"))
    assert not r.info["action_valid"]
    r = env.step("garbage")
    assert not r.info["format_ok"] and r.observation.text == "Nothing happens."
    env.close()


def test_fifty_step_limit():
    env = make("pick_soapbar_toilet")
    env.reset(seed=0)
    results = [env.step(act("look")) for _ in range(50)]
    assert results[-1].truncated and not any(r.truncated or r.terminated for r in results[:-1])
    env.close()


def test_goal_condition_rate_from_the_pddl_goal():
    problem = """(define (problem p) (:domain alfred) (:objects) (:init)
      (:goal (and (exists (?r - receptacle) (exists (?o - object) (and (cleanable ?o) (objectType ?o MugType)
        (receptacleType ?r CoffeeMachineType) (isClean ?o) (inReceptacle ?o ?r)))))))"""
    g = GoalConditions(problem)
    assert g.total == 2
    domain = {"object": ["mug_bar_1", "cup_bar_1"], "receptacle": ["coffeemachine_bar_1", "countertop_bar_1"]}
    static = {("cleanable", ("mug_bar_1",)), ("objecttype", ("mug_bar_1", "mugtype")),
              ("cleanable", ("cup_bar_1",)), ("objecttype", ("cup_bar_1", "cuptype")),
              ("receptacletype", ("coffeemachine_bar_1", "coffeemachinetype")),
              ("receptacletype", ("countertop_bar_1", "countertoptype"))}
    assert g.rate(static | {("inreceptacle", ("mug_bar_1", "countertop_bar_1"))}, domain) == 0.0
    assert g.rate(static | {("isclean", ("cup_bar_1",)), ("inreceptacle", ("cup_bar_1", "coffeemachine_bar_1"))},
                  domain) == 0.0  # the wrong object does not count
    assert g.rate(static | {("isclean", ("mug_bar_1",))}, domain) == 0.5
    assert g.rate(static | {("isclean", ("mug_bar_1",)), ("inreceptacle", ("mug_bar_1", "coffeemachine_bar_1"))},
                  domain) == 1.0


def test_seed_reproduces_the_game_and_expert():
    from services.envs.alfworld_env import AlfWorldEnv

    def run():
        env = AlfWorldEnv(task_types=[3, 4])
        obs, info = env.reset(seed=5)
        trace = [info["game"], obs.text]
        for _ in range(6):
            r = env.step(act(info["expert_action"]))
            info = r.info
            trace.append((r.observation.text, info["expert_action"], r.reward))
        env.close()
        return trace

    assert run() == run()


def test_real_dataset_tree_is_discovered_and_filtered(tmp_path, monkeypatch):
    """An alfworld-download layout (json_2.1.1/<split>/<task>/<trial>/game.tw-pddl + traj_data.json),
    built from the bundled games: split, task-type, solvable and movable filters as alfworld's loader."""
    import shutil

    from services.envs.alfworld_env import AlfWorldEnv, build_bundled_games

    built = {p.parent.name: p for p in build_bundled_games()}

    def put(split, name, trial, solvable=True, folder=None):
        d = tmp_path / "json_2.1.1" / split / (folder or name) / trial
        d.mkdir(parents=True)
        shutil.copy(built[name].parent / "traj_data.json", d / "traj_data.json")
        game = json.loads(built[name].read_text())
        game["solvable"] = solvable
        (d / "game.tw-pddl").write_text(json.dumps(game))

    put("train", "pick_soapbar_toilet", "trial_1")
    put("train", "heat_potato_diningtable", "trial_2")
    put("train", "clean_mug_coffeemachine", "trial_3", solvable=False)
    put("train", "pick_soapbar_toilet", "trial_4", folder="pick_and_place_with_movable_recep-x")
    put("valid_unseen", "cool_tomato_countertop", "trial_5")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    env = AlfWorldEnv()  # split "auto": the tree is there, so train
    assert env.split == "train" and sorted(g.parent.parent.name for g in env.games) == [
        "heat_potato_diningtable", "pick_soapbar_toilet"]
    env = AlfWorldEnv(task_types=[1])
    assert [g.parent.parent.name for g in env.games] == ["pick_soapbar_toilet"]
    obs, info = env.reset(seed=0)
    assert info["task_type"] == "pick_and_place_simple" and info["split"] == "train"
    env.close()
    env = AlfWorldEnv(split="valid_unseen")
    assert [g.parent.parent.name for g in env.games] == ["cool_tomato_countertop"]
    env = AlfWorldEnv(split="bundled")
    assert len(env.games) == len(bundled_game_names())


def test_sessions_stepped_from_several_threads_at_once_stay_sound():
    """The env service steps a batch's ALFWorld sessions in parallel threads; TextWorld's grammar
    parser is module-global, and concurrent steps once corrupted it (IndexError in tatsu)."""
    from concurrent.futures import ThreadPoolExecutor

    from services.envs.alfworld_env import AlfWorldEnv

    envs = [AlfWorldEnv() for _ in range(5)]
    infos = [e.reset(seed=i)[1] for i, e in enumerate(envs)]
    wins = 0

    def one(i: int) -> bool:
        r = envs[i].step(act(infos[i]["expert_action"] or "look"))
        infos[i] = envs[i].reset()[1] if r.terminated or r.truncated else r.info
        return r.terminated

    with ThreadPoolExecutor(4) as pool:
        for _ in range(25):
            wins += sum(pool.map(one, range(len(envs))))
    assert wins >= 3  # the experts kept winning: every step went through a sound engine
