"""The env service over real HTTP (uvicorn on 127.0.0.1), with the shared clients."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from services.envs.app import create_app
from services.envs.base import Obs, StepResult, TextActionEnv, base_info
from services.envs.registry import ENVS
from services.envs.settings import EnvServiceSettings
from shared.client import ServiceError
from shared.env_client import EnvClient, RemoteEnv


class ExplodingEnv(TextActionEnv):
    """Fault injection: raises inside step when told to (an env bug, as the service sees it)."""

    env_id = "exploding"
    default_options = {}

    def _reset(self, options):
        return Obs(text="ready", instruction="say boom"), {"format_ok": True}

    def _act(self, parsed):
        if parsed.action == "boom":
            raise RuntimeError("kaboom")
        return StepResult(Obs(text="ok", instruction="say boom"), 0.0, False, False, base_info(parsed, parsed.action, True))


class SlowEnv(ExplodingEnv):
    """Stands in for a slow ALFWorld step (a game load can take a second)."""

    env_id = "slow"
    fast = False

    def _act(self, parsed):
        time.sleep(2.0)
        return super()._act(parsed)


class CrashingEnv(ExplodingEnv):
    """Kills its own process on "die", as a segfault in native env code or the OOM killer would."""

    env_id = "crashing"

    def _act(self, parsed):
        if parsed.action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._act(parsed)


class StallingEnv(ExplodingEnv):
    """A cheap env (stepped in the worker's main thread) that stalls on "stall"."""

    env_id = "stalling"

    def _act(self, parsed):
        if parsed.action == "stall":
            time.sleep(1.5)
        return super()._act(parsed)


class SleepyEnv(ExplodingEnv):
    """A cheap env (stepped in the worker's main thread) whose every step takes 5 ms."""

    env_id = "sleepy"

    def _act(self, parsed):
        time.sleep(0.005)
        return super()._act(parsed)


class PrefetchProbeEnv(ExplodingEnv):
    """Leaves a file behind when the service asks it to prepare its next reset."""

    env_id = "prefetch-probe"
    default_options = {"marker": ""}

    def prefetch(self):
        Path(self.options["marker"]).write_text("prepared")


class Server:
    def __init__(self, port: int, **settings):
        envs = {**ENVS, "exploding": ExplodingEnv, "slow": SlowEnv, "crashing": CrashingEnv, "stalling": StallingEnv,
                "prefetch-probe": PrefetchProbeEnv, "sleepy": SleepyEnv}
        self.app = create_app(EnvServiceSettings(port=port, **settings), envs=envs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=[2, 0], ids=["procs2", "procs0"])
def server(port, request):
    """The service with two env worker processes (the default on two cores), and with the envs in
    the service process (`procs: 0`): every test below runs against both."""
    with Server(port, max_sessions=8, ttl_s=600, procs=request.param) as s:
        yield s


@pytest.fixture
def client(server):
    with EnvClient(server.url, retries=0) as c:
        yield c


def act(a: str) -> str:
    return json.dumps({"thoughts": "t", "action": a})


def test_health_ready_metrics_and_env_list(server, client):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    client.wait_ready(10)
    envs = {e.env_id: e for e in client.envs().envs}
    assert {"points24", "ezpoints", "numberline", "alfworld", "alfworld-thor"} <= set(envs)
    assert envs["points24"].actions[-1] == "=" and envs["points24"].options["target"] == 24
    assert envs["numberline"].actions == ["-", "+"]
    assert envs["alfworld-thor"].available is False and envs["points24"].available is True
    assert "ai2thor" in envs["alfworld-thor"].unavailable_reason
    client.create("points24", seed=0)
    text = httpx.get(server.url + "/metrics").text
    assert "env_sessions_open 1.0" in text and 'env_sessions_created_total{env_id="points24"} 1.0' in text


def test_create_step_reset_delete(client):
    r = client.create("points24", seed=3, options={"solvable_only": True})
    sid = r.session_id
    img = np.asarray(__import__("shared.codecs", fromlist=["b64_to_image"]).b64_to_image(r.observation.image))
    assert img.shape == (300, 300, 3)
    assert r.info["expert_action"] and r.info["expert_thoughts"] and r.info["format_ok"] is True
    cards = r.info["cards"]
    total = 0.0
    info = r.info
    while True:
        s = client.step(sid, act(info["expert_action"]))
        info = s.info
        total += s.reward
        if s.terminated or s.truncated:
            break
    assert s.terminated and info["won"] and s.reward == 10.0
    with pytest.raises(ServiceError) as e:
        client.step(sid, act("1"))
    assert e.value.status == 409 and e.value.error == "episode_over"
    again = client.reset(sid, seed=3)
    assert again.info["cards"] == cards and again.info["formula"] == ""
    client.delete(sid)
    with pytest.raises(ServiceError) as e:
        client.step(sid, act("1"))
    assert e.value.status == 404 and e.value.error == "unknown_session"


def test_unknown_session_and_env_are_404(server, client):
    for method, route in [("post", "/v1/sessions/nope/step"), ("post", "/v1/sessions/nope/reset"),
                          ("delete", "/v1/sessions/nope")]:
        kw = {"json": {"action": "x"} if route.endswith("step") else {}} if method == "post" else {}
        r = getattr(httpx, method)(server.url + route, **kw)
        assert r.status_code == 404 and r.json()["error"] == "unknown_session", route
    r = httpx.post(server.url + "/v1/sessions", json={"env_id": "chess"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_env"


@pytest.mark.parametrize("route,body", [
    ("/v1/sessions", {"env": "points24"}),
    ("/v1/sessions", {"env_id": "points24", "seed": "abc"}),
    ("/v1/sessions", {"env_id": "points24", "options": {"face_cards": 1}}),
    ("/v1/sessions", {"env_id": "points24", "options": {"target": -3}}),
    ("/v1/step", {"steps": []}),
    ("/v1/step", {"steps": [{"session_id": "x"}]}),
    ("/v1/step", "not json"),
])
def test_malformed_bodies_are_422(server, route, body):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + route, **kw)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}


def test_step_body_must_have_an_action(server, client):
    sid = client.create("numberline", seed=0).session_id
    r = httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"actoin": "+"})
    assert r.status_code == 422 and "action" in r.json()["detail"]


@pytest.mark.parametrize("env_id", ["points24", "ezpoints", "numberline"])
def test_garbage_output_gets_the_penalty_never_a_500(server, client, env_id):
    sid = client.create(env_id, seed=1).session_id
    for garbage in ["", "}{", '{"action": null}', "\u0000\ud7ff" * 50, '{"action": "' + "9" * 5000 + '"}',
                    "```json\n{\"action\": [1]}\n```", "x" * 100_000]:
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"action": garbage})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["reward"] == -1.0 and body["info"]["action"] is None and not body["info"]["action_valid"]
        if body["truncated"]:
            client.reset(sid)


def test_batched_step_keeps_order_and_isolates_errors(client):
    sids = [client.create("points24", seed=i).session_id for i in range(4)]
    bad = client.create("exploding").session_id
    steps = [(sids[0], act("(")), (sids[1], "garbage"), ("missing", act("1")), (bad, act("boom")),
             (sids[0], act("(")), (sids[2], act("=")), (sids[3], act("("))]
    out = client.step_batch(steps)
    assert [o.session_id for o in out] == [s for s, _ in steps]
    assert out[0].info["formula"] == "(" and out[4].info["formula"] == "( ("  # same session: in order
    assert out[1].reward == -1.0 and not out[1].info["format_ok"]
    assert out[2].error.error == "unknown_session" and out[2].observation is None
    assert out[3].error.error == "session_failed" and "kaboom" in out[3].error.detail
    assert out[5].terminated and out[5].reward == -1.0
    assert out[6].observation.image and out[6].error is None


def test_an_env_that_raises_fails_its_own_session_only(server, client):
    bad = client.create("exploding").session_id
    good = client.create("numberline", seed=0).session_id
    assert client.step(bad, act("fine")).info["action"] == "fine"
    with pytest.raises(ServiceError) as e:
        client.step(bad, act("boom"))
    assert e.value.status == 409 and e.value.error == "session_failed" and "RuntimeError: kaboom" in e.value.detail
    for call in (lambda: client.step(bad, act("fine")), lambda: client.reset(bad)):
        with pytest.raises(ServiceError) as e:
            call()
        assert e.value.status == 409 and "kaboom" in e.value.detail
    assert client.step(good, act("+")).info["format_ok"]  # the service and other sessions carry on
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert 'env_session_failures_total{env_id="exploding"} 1.0' in httpx.get(server.url + "/metrics").text
    client.delete(bad)  # a failed session can still be deleted


def test_a_slow_step_does_not_block_other_sessions(client):
    slow = client.create("slow").session_id
    fast = client.create("points24", seed=0).session_id
    done = {}

    def slow_step():
        with EnvClient(client.http.base_url, retries=0) as other:
            other.step(slow, act("x"))
        done["slow"] = time.monotonic()

    t = threading.Thread(target=slow_step)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.2)
    for _ in range(10):
        client.step(fast, act("("))
    fast_done = time.monotonic()
    t.join()
    assert fast_done - t0 < 1.8 < done["slow"] - t0  # ten fast steps finished while the slow one ran
    out = client.step_batch([(slow, act("x")), (fast, act("("))])  # the same inside one batch
    assert out[0].error is None and out[1].error is None


@pytest.mark.parametrize("procs", [2, 0])
def test_max_sessions_and_ttl(port, procs):
    with Server(port, max_sessions=2, ttl_s=0.5, procs=procs) as s, EnvClient(s.url, retries=0) as c:
        a = c.create("numberline").session_id
        c.create("numberline")
        with pytest.raises(ServiceError) as e:
            c.create("numberline")
        assert e.value.status == 429 and e.value.error == "too_many_sessions"
        time.sleep(0.7)
        c.create("numberline")  # the idle ones expired to make room
        with pytest.raises(ServiceError) as e:
            c.step(a, act("+"))
        assert e.value.status == 404


def test_bearer_token_guards_mutating_routes(server, monkeypatch):
    monkeypatch.setenv("GTR_API_TOKEN", "s3cret")
    r = httpx.post(server.url + "/v1/sessions", json={"env_id": "numberline"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/envs").status_code == 200
    with EnvClient(server.url, retries=0) as c:  # picks the token up from the environment
        assert c.create("numberline").session_id


def test_gymnasium_remote_env(server):
    import gymnasium as gym

    env = RemoteEnv("numberline", base_url=server.url, options={"max_position": 6})
    assert isinstance(env, gym.Env)
    obs, info = env.reset(seed=4)
    first = (info["target"], info["current"])
    assert obs["image"].shape == (300, 300, 3) and obs["image"].dtype == np.uint8
    assert '"action"' in obs["instruction"]
    sid = env.session_id
    while True:
        obs, reward, terminated, truncated, info = env.step(act(info["expert_action"]))
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and info["won"]
    obs2, info2 = env.reset(seed=4)
    assert env.session_id == sid and (info2["target"], info2["current"]) == first  # same session, same seed
    env.close()
    assert env.session_id is None


def test_alfworld_over_http_or_a_clear_error(server, client):
    from services.envs.alfworld_env import alfworld_status

    ok, _ = alfworld_status()
    if not ok:
        r = httpx.post(server.url + "/v1/sessions", json={"env_id": "alfworld"})
        assert r.status_code == 501 and "pip install 'gtr-turbo[alfworld]'" in r.json()["detail"]
        return
    r = client.create("alfworld", seed=0, options={"game": "heat_potato_diningtable"})
    assert r.observation.image is None and r.observation.admissible_actions
    assert r.info["task_type"] == "pick_heat_then_place_in_recep" and r.info["goal_condition_rate"] == 0.0
    s = client.step(r.session_id, act("go to cabinet 99"))
    assert s.observation.text == "Nothing happens." and s.reward == pytest.approx(-1.0)
    s = client.step(r.session_id, act(r.info["expert_action"]))
    assert s.info["action_valid"] and s.reward == pytest.approx(0.0)
    r = httpx.post(server.url + "/v1/sessions", json={"env_id": "alfworld-thor"})
    assert r.status_code == 501 and "ai2thor" in r.json()["detail"]


def test_batched_auto_reset_restarts_finished_episodes(client):
    a = client.create("points24", seed=1).session_id
    b = client.create("points24", seed=2).session_id
    out = client.step_batch([(a, act("=")), (b, act("("))], auto_reset=True)
    assert out[0].terminated and out[0].reset is not None and out[0].reset.info["formula"] == ""
    assert out[0].reset.observation.image and out[1].reset is None
    out = client.step_batch([(a, act("(")), (b, act("("))])  # the new episode goes on, no 409
    assert out[0].error is None and out[0].info["formula"] == "(" and out[1].info["formula"] == "( ("


def test_batch_spreads_over_worker_processes_in_order(server, client):
    sids = [client.create("points24", seed=i).session_id for i in range(6)]
    manager = server.app.state.router
    assert len({id(manager._where[sid]) for sid in sids}) == max(1, manager.procs)  # spread evenly
    out = client.step_batch([(sid, act(a)) for sid, a in zip(sids, ["(", "(", "=", "(", "zzz", "("])])
    assert [o.session_id for o in out] == sids and all(o.error is None for o in out)
    assert [o.info["formula"] for o in out] == ["(", "(", "", "(", "", "("]
    assert out[2].terminated and out[4].reward == -1.0 and not out[4].info["action_valid"]
    again = client.step_batch([(sid, act("(")) for sid in sids[3:]])  # each session keeps its own state
    assert [o.info["formula"] for o in again] == ["( (", "(", "( ("]


@pytest.mark.parametrize("procs", [2])
def test_a_dead_worker_fails_its_sessions_only(port, procs):
    with Server(port, max_sessions=16, ttl_s=600, procs=procs) as s, EnvClient(s.url, retries=0) as c:
        manager = s.app.state.router
        victim = c.create("crashing").session_id
        doomed_pid = manager._where[victim].pid
        others = [c.create("points24", seed=i).session_id for i in range(3)]
        same = [o for o in others if manager._where[o] is manager._where[victim]]
        apart = [o for o in others if manager._where[o] is not manager._where[victim]]
        assert same and apart
        with pytest.raises(ServiceError) as e:
            c.step(victim, act("die"))
        assert e.value.status == 409 and e.value.error == "session_failed" and "exited with code -9" in e.value.detail
        for sid in same:  # the dead worker's other sessions fail too, and say why
            with pytest.raises(ServiceError) as e:
                c.step(sid, act("("))
            assert e.value.status == 409 and f"pid {doomed_pid}" in e.value.detail
        out = c.step_batch([(apart[0], act("(")), (same[0], act("("))])
        assert out[0].error is None and out[1].error.error == "session_failed"
        assert httpx.get(s.url + "/readyz").status_code == 200
        fresh = [c.create("points24", seed=9).session_id for _ in range(2)]  # a new worker takes new sessions
        assert all(c.step(f, act("(")).info["formula"] == "(" for f in fresh)
        assert doomed_pid not in {p.pid for p in manager.shards}
        for sid in [victim, *same]:
            c.delete(sid)  # failed sessions can still be deleted
        metrics = httpx.get(s.url + "/metrics").text
        assert 'env_session_failures_total{env_id="crashing"} 1.0' in metrics
        assert "env_worker_deaths_total 1.0" in metrics


def test_idle_workers_prepare_next_resets():
    from services.envs.registry import Registry
    from services.envs.sessions import SessionTable

    m = SessionTable(Registry(), threads=1)
    try:
        m.create("a", "points24", 1, {})
        m.create("b", "numberline", 1, {})
        assert m.prefetch_one() and m.prefetch_one() and not m.prefetch_one()  # each created session once
        m.step("a", act("("), auto_reset=True)
        assert not m.prefetch_one()  # a step that did not reset leaves nothing to prepare
        out = m.step("a", act("="), auto_reset=True)
        assert out.reset is not None and m.prefetch_one() and not m.prefetch_one()
        m.reset("b", None, None)
        with m.get("b").lock:  # a session busy with a step is skipped (dropped), never waited for
            assert not m.prefetch_one()
        assert not m.prefetch_one()
    finally:
        m.shutdown()


def test_requests_piling_up_at_a_stalled_worker_never_block_the_service(port):
    """More than a pipe's worth (1 MB) of requests for a worker that is stuck: they wait in the
    service's writer thread, the other worker's sessions are served meanwhile, all complete."""
    from concurrent.futures import ThreadPoolExecutor

    with Server(port, max_sessions=16, ttl_s=600, procs=2) as s, EnvClient(s.url, retries=0) as c:
        where = s.app.state.router._where
        sids = [c.create("stalling").session_id for _ in range(4)]
        stuck = [x for x in sids if where[x] is where[sids[0]]]
        free = [x for x in sids if where[x] is not where[sids[0]]]
        big = act("y" * 300_000)  # parsed, found unknown, penalised: a big request all the same

        def call(fn):
            with EnvClient(s.url, retries=0) as own:
                return fn(own)

        with ThreadPoolExecutor(8) as pool:
            stall = pool.submit(call, lambda k: k.step(stuck[0], act("stall")))
            time.sleep(0.3)
            piled = [pool.submit(call, lambda k: k.step_batch([(stuck[1], big)] * 2)) for _ in range(4)]
            time.sleep(0.3)
            assert c.step(free[0], act("fine")).info["action"] == "fine"
            assert not stall.done()  # served while the other worker is still stuck
            assert any(t.name.endswith("-writer") for t in threading.enumerate())  # the pipe is full
            assert stall.result(30).info["action"] == "stall"
            assert all(len(f.result(30)) == 2 for f in piled)
        assert c.step(stuck[1], act("fine")).info["action"] == "fine"


def test_an_idle_worker_prepares_the_next_reset(port, tmp_path):
    marker = tmp_path / "prepared"
    with Server(port, max_sessions=4, ttl_s=600, procs=2) as s, EnvClient(s.url, retries=0) as c:
        c.create("prefetch-probe", options={"marker": str(marker)})
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()  # nobody asked: the worker did it while waiting for requests


def test_env_classes_a_worker_cannot_import_get_a_clear_error():
    from fastapi.testclient import TestClient

    class Local(ExplodingEnv):  # defined in a function: not importable by name
        env_id = "local"

    app = create_app(EnvServiceSettings(procs=2), envs={**ENVS, "local": Local})
    with pytest.raises(RuntimeError, match="importable by name.*--procs 0"):
        with TestClient(app):
            pass
    with TestClient(create_app(EnvServiceSettings(procs=0), envs={**ENVS, "local": Local})) as c:
        assert c.post("/v1/sessions", json={"env_id": "local"}).status_code == 200
