"""Client input that once answered 500 or hurt a session (issue 11), against the real service."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from services.envs.alfworld_env import alfworld_status
from shared.client import ServiceError
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
        for seed in (-1, 2**53 + 1, 1.5):
            r = httpx.post(f"{url}/v1/sessions/{sid}/reset", json={"seed": seed})
            assert r.status_code == 422 and "seed" in r.json()["detail"], r.text
        assert c.step(sid, act("(")).info["formula"] == "("  # not failed, not reset
        assert httpx.post(f"{url}/v1/sessions", json={"env_id": "points24", "seed": -5}).status_code == 422
        assert c.reset(sid, seed=2**53).info["formula"] == ""


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
    r = httpx.post(f"{url}/v1/sessions", json={"env_id": "alfworld", "options": options}, timeout=120)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_the_game_data_directory_is_server_configuration(tmp_path):
    """--alfworld-data reaches the env (here: a tree without games, so `split: train` says so)."""
    if not alfworld_status()[0]:
        pytest.skip(alfworld_status()[1])
    from tests.conftest import free_port

    with Server(free_port(), procs=0, alfworld_data=str(tmp_path)) as s:
        r = httpx.post(f"{s.url}/v1/sessions", json={"env_id": "alfworld", "options": {"split": "train"}}, timeout=120)
        assert r.status_code == 501 and str(tmp_path) in r.json()["detail"], r.text
        assert "data_path" not in httpx.get(f"{s.url}/v1/envs").text


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # killed, as it should be


def test_a_hung_worker_is_killed_and_replaced_and_the_others_carry_on(port):
    """A worker stopped with SIGSTOP (as a deadlocked native call would hang it): its calls pass
    their deadline, it is killed, its sessions answer 409, other sessions and /readyz carry on."""
    with Server(port, max_sessions=16, ttl_s=600, procs=2, call_timeout_s=2) as s, \
            EnvClient(s.url, retries=0, timeout=60) as c:
        router = s.app.state.router
        sids = [c.create("points24", seed=i).session_id for i in range(4)]
        hung = router._where[sids[0]]
        same = [x for x in sids if router._where[x] is hung]
        apart = [x for x in sids if router._where[x] is not hung]
        assert len(same) == len(apart) == 2
        pid = hung.pid
        _stop(pid)
        try:
            with pytest.raises(ServiceError) as e:
                c.step(same[0], act("("))
            assert e.value.status == 409 and e.value.error == "session_failed"
            assert "did not answer within 2s" in e.value.detail
            out = c.step_batch([(apart[0], act("(")), (same[1], act("("))])
            assert out[0].error is None and out[1].error.error == "session_failed"  # at once: the worker is gone
            assert c.step(apart[1], act("(")).info["formula"] == "("
            assert httpx.get(s.url + "/readyz", timeout=30).status_code == 200  # the live worker answers
            fresh = c.create("points24", seed=9).session_id  # a new worker replaced the killed one
            assert c.step(fresh, act("(")).info["formula"] == "("
            assert pid not in {sh.pid for sh in router.shards} and all(sh.ready for sh in router.shards)
            c.delete(same[0])  # a failed session can be deleted
            assert "env_worker_deaths_total 1.0" in httpx.get(s.url + "/metrics").text
            # /readyz does not hang on a stopped worker either: it answers 503 within the deadline
            other = router.shards[0].pid
            _stop(other)
            try:
                r = httpx.get(s.url + "/readyz", timeout=30)
                assert r.status_code == 503 and "did not answer" in r.json()["detail"]
            finally:
                _resume(other)
        finally:
            _resume(pid)


def test_a_batch_above_the_limit_is_413_naming_it(port):
    with Server(port, procs=0, max_batch_steps=8) as s, EnvClient(s.url, retries=0) as c:
        sid = c.create("numberline", seed=0).session_id
        r = httpx.post(s.url + "/v1/step", json={"steps": [{"session_id": sid, "action": act("+")}] * 9})
        assert r.status_code == 413 and r.json()["error"] == "batch_too_large"
        assert "limit is 8" in r.json()["detail"] and "--max-batch-steps" in r.json()["detail"]
        assert len(c.step_batch([(sid, act("+"))] * 8)) == 8


def test_a_big_batch_does_not_starve_other_sessions_of_its_worker(port):
    """A 600-step batch (3 s of env time) on the only worker: another client's step is answered
    between the batch's parts, long before the batch is done."""
    from concurrent.futures import ThreadPoolExecutor

    with Server(port, procs=1, max_batch_steps=1000, batch_part_steps=50) as s, \
            EnvClient(s.url, retries=0, timeout=60) as c:
        big = c.create("sleepy").session_id
        other = c.create("sleepy").session_id
        with ThreadPoolExecutor(1) as pool, EnvClient(s.url, retries=0, timeout=60) as c2:
            batch = pool.submit(c2.step_batch, [(big, act("x"))] * 600)
            time.sleep(0.5)
            assert c.step(other, act("y")).info["action"] == "y"
            assert not batch.done()  # answered while the batch was still running
            assert len(batch.result()) == 600


def test_a_session_is_never_expired_while_a_call_runs(port):
    """The TTL counts from a session's last call, and never expires one with a call in flight
    (here a 2 s step against a 0.5 s TTL, the reaper sweeping every 0.2 s)."""
    with Server(port, procs=0, ttl_s=0.5) as s, EnvClient(s.url, retries=0, timeout=30) as c:
        sid = c.create("slow").session_id
        assert c.step(sid, act("x")).info["action"] == "x"
        assert c.step(sid, act("y")).info["action"] == "y"  # still there right after the long call
        time.sleep(1.2)
        with pytest.raises(ServiceError) as e:  # idle past the TTL: gone
            c.step(sid, act("z"))
        assert e.value.status == 404
