"""The trainer's HTTP service (status, metrics, checkpoint, stop) and the teacher-down policy."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from services.trainer.app import create_app
from services.trainer.config import TrainConfig
from services.trainer.guidance import TeacherLink
from services.trainer.status import StatusBoard
from shared.client import ServiceError
from shared.schemas import LogitsItem
from shared.teacher_client import TeacherClient
from fake_http import serve


@pytest.fixture
def board():
    b = StatusBoard(updates_total=5, run_dir="runs/x", guidance="kl")
    b.loop_alive.set()
    return b


def test_status_and_metrics(board):
    c = TestClient(create_app(board))
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.get("/readyz").status_code == 200
    s = c.get("/v1/status").json()
    assert s["phase"] == "starting" and s["updates_total"] == 5 and s["guidance"] == "kl"
    board.set_phase("rollout")
    board.record({"update": 2, "env_steps": 64, "success_rate": 0.25, "mean_return": -1.5, "format_ok_rate": 0.9,
                  "kl_mean": 0.03, "teacher_version": 3, "seconds_rollout": 1.5, "seconds_teacher": 0.2,
                  "seconds_ppo": 0.7, "teacher/unavailable": 1})
    s = c.get("/v1/status").json()
    assert (s["phase"], s["update"], s["env_steps"], s["teacher_version"], s["success_rate"]) == ("rollout", 2, 64, 3, 0.25)
    assert s["last_metrics"]["kl_mean"] == 0.03
    text = c.get("/metrics").text
    assert "gtr_trainer_update 2.0" in text and "gtr_trainer_teacher_version 3.0" in text
    assert 'gtr_trainer_phase_seconds{phase="rollout"} 1.5' in text
    assert "gtr_trainer_teacher_unavailable_total 1.0" in text
    board.loop_alive.clear()
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["error"] == "not_ready"


def test_checkpoint_waits_for_the_loop_and_stop_sets_the_flag(board):
    c = TestClient(create_app(board, checkpoint_timeout_s=5))

    def loop():  # the training loop's side: notice the request, save, report
        assert board.checkpoint_requested.wait(5)
        board.checkpoint_saved()

    t = threading.Thread(target=loop)
    t.start()
    r = c.post("/v1/checkpoint")
    t.join()
    assert r.status_code == 200 and r.json()["ok"] and board.checkpoints_saved == 1
    assert not board.stop_requested.is_set()
    assert c.post("/v1/stop").json()["ok"] and board.stop_requested.is_set()
    board.loop_alive.clear()
    assert c.post("/v1/checkpoint").status_code == 409


def test_mutating_routes_need_the_token(board, monkeypatch):
    monkeypatch.setenv("GTR_API_TOKEN", "s3cret")
    c = TestClient(create_app(board))
    assert c.post("/v1/stop").status_code == 401 and not board.stop_requested.is_set()
    assert c.post("/v1/stop", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/status").status_code == 200  # reads stay open


@contextmanager
def _link(handler, **teacher):
    """A TeacherLink to a fake teacher served over real HTTP by `handler(method, path, body)`."""
    cfg = TrainConfig(teacher={"retries": 0, **teacher})
    with serve(handler) as url, TeacherClient(url, retries=0, backoff=0.01) as client:
        yield TeacherLink(cfg, client=client)


ITEM = LogitsItem(messages=[{"role": "user", "content": "hi"}], completion_ids=[5, 6])


def test_teacher_down_skip_returns_none_and_conflicts_raise():
    with _link(lambda *req: (503, {"error": "not_ready", "detail": "loading"})) as link:
        assert link.logprobs([ITEM], 1.0) is None
    with _link(lambda *req: (409, {"error": "conflict", "detail": "tokenizer mismatch"})) as link:
        with pytest.raises(ServiceError, match="tokenizer mismatch"):
            link.logprobs([ITEM], 1.0)


def test_teacher_down_wait_retries_until_it_answers():
    calls = {"logits": 0}

    def handler(method, path, body):
        if path == "/readyz":
            return 200, {"status": "ok"}
        calls["logits"] += 1
        if calls["logits"] < 3:
            return 503, {"error": "not_ready", "detail": "loading"}
        return 200, {"teacher_version": 4, "items": [{"token_ids": [5, 6], "logprobs": [-1.0, -2.0]}]}

    with _link(handler, on_unavailable="wait", wait_timeout_s=30) as link:
        version, items = link.logprobs([ITEM], 1.0)
    assert version == 4 and items[0].logprobs == [-1.0, -2.0] and calls["logits"] == 3


def test_sft_guidance_keeps_parseable_teacher_thoughts_with_the_agents_action(tiny_model):
    import numpy as np

    from services.trainer.guidance import ReplayBuffer, sft_guidance
    from services.trainer.rollout import RolloutStep
    from services.trainer.spans import split_spans

    tok = tiny_model[1].tokenizer
    good = tok('{"thoughts": "3 is less than 5, so I add one.", "action": "-"}', add_special_tokens=False)["input_ids"]
    # What the env's parser rejects is dropped: prose, truncated JSON, a non-string action.
    bad = [tok(t, add_special_tokens=False)["input_ids"] for t in
           ("I cannot decide", '{"thoughts": "3 is less than 5, so", "action": "-', '{"thoughts": "add one", "action": 1}')]
    agent = tok('{"thoughts": "hmm", "action": "+"}', add_special_tokens=False)["input_ids"]

    def handler(method, path, body):
        items = [{"text": tok.decode(ids), "token_ids": ids, "logprobs": [-1.0] * len(ids)} for ids in (good, *bad)]
        return 200, {"teacher_version": 7, "items": items}

    def step():
        sp = split_spans(tok, agent)
        return RolloutStep(prompt=None, messages=[{"role": "user", "content": "hi"}], image=None, tokens=agent, text="",
                           n_thought=sp.n_thought, thought_ok=True, logprob=0.0, value=0.0, student_thought_lp=None,
                           env_reward=0.0, reward=0.0, terminated=False, truncated=False, format_ok=True, info={},
                           env_index=0)

    steps = [step() for _ in range(4)]
    buf = ReplayBuffer(8)
    with _link(handler) as link:
        m = sft_guidance(link, steps, TrainConfig(guidance={"mode": "sft"}), tok, buf, seed=0)
    assert m["sft/teacher_parse_rate"] == 0.25 and m["teacher/version"] == 7 and len(buf) == 1  # garbage dropped
    ex = buf.items[0]
    n_teacher = split_spans(tok, good).n_thought
    assert ex.n_thought == n_teacher and ex.ids[:n_teacher] == good[:n_teacher]
    assert ex.ids[n_teacher:] == agent[split_spans(tok, agent).n_thought:]  # the agent's own action
    assert tok.decode(ex.ids).endswith('"action": "+"}')
    assert all(s.teacher_version == 7 for s in steps)
    assert len(buf.sample(5, np.random.default_rng(0))) == 1
