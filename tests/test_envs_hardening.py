"""Client input that once answered 500 or hurt a session (issue 11), against the real service."""

from __future__ import annotations

import httpx
import pytest

from services.envs.alfworld_env import alfworld_status
from shared.env_client import EnvClient
from tests.test_envs_service import Server, act


@pytest.fixture(scope="module")
def url():
    from tests.conftest import free_port

    with Server(free_port(), max_sessions=16, ttl_s=600, procs=1) as s:
        yield s.url


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_reset_with_a_negative_seed_is_422_and_the_session_lives(url):
    with EnvClient(url, retries=0) as c:
        sid = c.create("points24", seed=1).session_id
        for seed in (-1, 2**64, 1.5):
            r = httpx.post(f"{url}/v1/sessions/{sid}/reset", json={"seed": seed})
            assert r.status_code == 422 and "seed" in r.json()["detail"], r.text
        assert c.step(sid, act("(")).info["formula"] == "("  # not failed, not reset
        assert httpx.post(f"{url}/v1/sessions", json={"env_id": "points24", "seed": -5}).status_code == 422
        assert c.reset(sid, seed=2**64 - 1).info["formula"] == ""


@pytest.mark.parametrize("depth", [900, 17])
@pytest.mark.parametrize("where", ["create", "reset"])
def test_deeply_nested_options_are_422(url, depth, where):
    """~900 deep once failed while being pickled to the env worker (a 500)."""
    body = {"env_id": "points24", "options": {"cards": nested(depth)}}
    if where == "create":
        r = httpx.post(f"{url}/v1/sessions", json=body)
    else:
        with EnvClient(url, retries=0) as c:
            sid = c.create("points24", seed=0).session_id
        r = httpx.post(f"{url}/v1/sessions/{sid}/reset", json={"options": body["options"]})
    assert r.status_code == 422 and "nest deeper than 16" in r.json()["detail"], r.text


def test_options_too_deep_for_the_json_parser_are_4xx_too(url):
    text = '{"env_id": "points24", "options": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    r = httpx.post(f"{url}/v1/sessions", content=text, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("options,message", [
    ({"data_path": "/etc"}, "unknown option(s) ['data_path']"),
    ({"data_path": 5}, "unknown option(s) ['data_path']"),
    ({"data_root": "/etc"}, "unknown option(s) ['data_root']"),  # the constructor's server setting: not an option
    ({"task_types": [[1]]}, "'task_types' must be a non-empty list of integers"),
    ({"task_types": [True]}, "'task_types' must be a non-empty list of integers"),
    ({"split": ["train"]}, "'split' must be one of"),
    ({"game": {"a": 1}}, "'game' must be"),
])
def test_alfworld_options_are_checked_and_paths_are_not_a_client_option(url, options, message):
    if not alfworld_status()[0]:
        pytest.skip(alfworld_status()[1])
    r = httpx.post(f"{url}/v1/sessions", json={"env_id": "alfworld", "options": options})
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_the_game_data_directory_is_server_configuration(tmp_path):
    """--alfworld-data reaches the env (here: a tree without games, so `split: train` says so)."""
    if not alfworld_status()[0]:
        pytest.skip(alfworld_status()[1])
    from tests.conftest import free_port

    with Server(free_port(), procs=0, alfworld_data=str(tmp_path)) as s:
        r = httpx.post(f"{s.url}/v1/sessions", json={"env_id": "alfworld", "options": {"split": "train"}})
        assert r.status_code == 501 and str(tmp_path) in r.json()["detail"], r.text
        assert "data_path" not in httpx.get(f"{s.url}/v1/envs").text
