"""The env service's clients: the gymnasium `RemoteEnv` passes gymnasium's own checker for every
env id, the trainer's `EnvPool` never sends a step or a reset twice, and a pool spread over
env replicas replaces a dead replica's sessions on the others."""

from __future__ import annotations

import json
import time

import pytest
from fastapi import FastAPI, Request

from services.trainer.app import ServerThread
from services.trainer.envpool import EnvPool
from shared.client import ServiceError
from shared.env_client import EnvClient, RemoteEnv
from tests.trainer_services import free_port, running_services


@pytest.fixture(scope="module")
def env_url():
    with running_services(None, None, teacher=False) as (url, _):
        yield url


def available_env_ids(url: str) -> list[str]:
    with EnvClient(url) as c:
        return [s.env_id for s in c.envs().envs if s.available]


def act(a: str) -> str:
    return json.dumps({"thoughts": "t", "action": a})


def test_every_available_env_passes_gymnasium_check_env(env_url):
    from gymnasium.utils.env_checker import check_env

    ids = available_env_ids(env_url)
    assert {"points24", "ezpoints", "numberline"} <= set(ids)
    for env_id in ids:
        env = RemoteEnv(env_id, base_url=env_url)
        try:
            check_env(env, skip_render_check=True)
        finally:
            env.close()


@pytest.mark.parametrize("env_id", ["points24", "numberline", "alfworld"])
def test_every_observation_of_an_expert_episode_lies_in_the_declared_space(env_url, env_id):
    if env_id not in available_env_ids(env_url):
        pytest.skip(f"{env_id} is not available here")
    env = RemoteEnv(env_id, base_url=env_url)
    try:
        obs, info = env.reset(seed=3)
        assert ("image" in obs) == (env_id != "alfworld")
        assert ("admissible_actions" in obs) == (env_id == "alfworld")
        seen = 1
        assert env.observation_space.contains(obs), obs.keys()
        for _ in range(8):
            obs, _r, terminated, truncated, info = env.step(act(info.get("expert_action") or "?"))
            assert env.observation_space.contains(obs)
            seen += 1
            if terminated or truncated:
                break
        assert seen >= 2
    finally:
        env.close()


class SlowEnvService:
    """An env service whose steps and resets outlast the client's timeout; it counts every call
    it receives, to show what the client sent."""

    def __init__(self, delay: float):
        self.calls: dict[str, int] = {}
        app = FastAPI()
        obs = {"image": None, "text": "t", "instruction": "say something", "admissible_actions": None}

        def count(request: Request) -> None:
            key = f"{request.method} {request.url.path.split('/')[-1]}"
            self.calls[key] = self.calls.get(key, 0) + 1

        @app.get("/readyz")
        def readyz():
            return {"status": "ok"}

        @app.post("/v1/sessions")
        def create(request: Request):
            count(request)
            return {"session_id": f"s{self.calls['POST sessions']}", "observation": obs, "info": {}}

        @app.post("/v1/sessions/{sid}/reset")
        def reset(sid: str, request: Request):
            count(request)
            time.sleep(delay)
            return {"observation": obs, "info": {}}

        @app.post("/v1/step")
        def step(request: Request):
            count(request)
            time.sleep(delay)
            return []

        @app.delete("/v1/sessions/{sid}")
        def delete(sid: str, request: Request):
            count(request)
            return {}

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = ServerThread(app, "127.0.0.1", self.port)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.stop()


def test_a_step_or_reset_that_times_out_is_sent_once_and_fails_as_the_envs():
    with SlowEnvService(delay=1.5) as svc:
        pool = EnvPool(svc.url, "anything", 1, timeout_s=0.5, retries=3)
        try:
            pool.open([0])
            first = pool.session_ids[0]
            out = pool.step([act("x")])
            assert svc.calls["POST step"] == 1  # never sent twice, whatever `retries` says
            # The episode ends as the env's failure (not the agent's), in a fresh session.
            assert out[0].terminated and "env_error" in out[0].info and "/v1/step" in out[0].info["env_error"]
            assert pool.session_ids[0] != first
            pool.reset(0, seed=5)
            assert svc.calls["POST reset"] == 1
            assert svc.calls["POST sessions"] == 3  # the open, the replacement after the step, after the reset
        finally:
            pool.close()
        with EnvClient(svc.url, timeout=0.5, retries=3) as c, pytest.raises(ServiceError) as e:
            c.step_batch([("s1", act("x"))])
        assert e.value.service == "envs" and e.value.route == "/v1/step"
        assert svc.calls["POST step"] == 2  # one more call, one more request
        time.sleep(1.6)  # let the slow handlers finish before the server stops


def step_all(pool: EnvPool, action: str):
    """One batched step, and a reset for each episode that ended (as the rollout does)."""
    out = pool.step([act(action)] * pool.num_envs)
    for i, r in enumerate(out):
        if (r.terminated or r.truncated) and "env_error" not in r.info:
            pool.reset(i, seed=100 + i)
    return out


def env_service() -> tuple[ServerThread, str]:
    from services.envs.app import create_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ServerThread(create_app(), "127.0.0.1", port).start()
    EnvClient(url).wait_ready(60)
    return server, url


def test_sessions_spread_over_env_replicas_and_move_off_a_dead_one():
    (a, url_a), (b, url_b) = env_service(), env_service()
    pool = EnvPool(f"{url_a},{url_b}", "numberline", 4, timeout_s=10, retries=0)
    try:
        pool.open([1, 2, 3, 4])
        assert sorted(s.replica for s in pool.sessions) == [0, 0, 1, 1]
        out = step_all(pool, "+")
        assert not any("env_error" in r.info for r in out)
        # Replica b dies: its sessions' episodes end as env errors, and new ones replace them on a.
        on_b = {i for i, s in enumerate(pool.sessions) if s.replica == 1}
        b.stop()
        out = step_all(pool, "+")
        assert {i for i in range(4) if "env_error" in out[i].info} == on_b
        assert all(out[i].terminated for i in on_b)
        assert [s.replica for s in pool.sessions] == [0, 0, 0, 0] and pool.down == {1}
        out = step_all(pool, "-")
        assert not any("env_error" in r.info for r in out)
    finally:
        pool.close()
        a.stop()
        b.stop()


def test_a_dead_replica_is_marked_down_and_new_sessions_avoid_it():
    dead = f"http://127.0.0.1:{free_port()}"
    with running_services(None, None, teacher=False) as (url, _):
        pool = EnvPool([dead, url], "numberline", 3, timeout_s=5, retries=0)
        try:
            results = pool.open([1, 2, 3])
            assert len(results) == 3 and all(s.replica == 1 for s in pool.sessions)
            assert pool.down == {0}
            assert not any("env_error" in r.info for r in pool.step([act("+")] * 3))
        finally:
            pool.close()


def test_env_url_accepts_a_list_and_refuses_an_empty_one():
    from services.trainer.config import load_train_config
    from shared.config import ConfigError

    cfg = load_train_config(None, ["env.url=[http://a:1, http://b:2]"])
    assert cfg.env.url == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError):
        load_train_config(None, ["env.url=[]"])
