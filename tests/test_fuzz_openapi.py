"""Schemathesis over every route of the three real services (uvicorn on 127.0.0.1: the env service
with a worker process, the teacher on the tiny model, the trainer's status app), issue 11 §2/§7.
Each call is checked by schemathesis' default checks: never a 5xx, a status code, content type and
body that the route's OpenAPI declares. Bounded by `MAX_EXAMPLES` per route (about a minute in all
on two cores); raise it locally (`GTR_FUZZ_EXAMPLES=500`) for a deeper run."""

from __future__ import annotations

import os
import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.trainer.app import ServerThread
from shared.client import ServiceClient
from trainer_services import free_port

MAX_EXAMPLES = int(os.environ.get("GTR_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _serve(app, service: str, ready_timeout: float = 120):
    port = free_port()
    server = ServerThread(app, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    ServiceClient(url, service=service).wait_ready(timeout=ready_timeout)
    return server, url


@pytest.fixture(scope="module")
def env_url():
    from services.envs.app import create_app
    from services.envs.settings import EnvServiceSettings

    server, url = _serve(create_app(EnvServiceSettings(procs=1, max_sessions=64, ttl_s=600)), "env")
    yield url
    server.stop()


@pytest.fixture(scope="module")
def teacher_url(tiny_model_dir, tmp_path_factory):
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    app = create_app(TeacherSettings(model=str(tiny_model_dir), store=str(tmp_path_factory.mktemp("store")),
                                     device="cpu", max_tokens=128))
    server, url = _serve(app, "teacher")
    yield url
    server.stop()


@pytest.fixture(scope="module")
def trainer_url(tmp_path_factory):
    """The trainer's real app and StatusBoard; a thread plays the loop's side of a save request
    (what train() does at its next safe point: save, then `checkpoint_saved`)."""
    from services.trainer.app import create_app
    from services.trainer.status import StatusBoard

    board = StatusBoard(3, str(tmp_path_factory.mktemp("run")), "kl")
    board.loop_alive.set()
    done = threading.Event()

    def loop():
        while not done.is_set():
            if board.checkpoint_requested.wait(0.05):
                board.checkpoint_saved()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    server, url = _serve(create_app(board, checkpoint_timeout_s=5), "trainer")
    yield url
    done.set()
    server.stop()


# The schemas come from the apps themselves at collection time (an app's OpenAPI needs no model
# loaded); the calls go to the live servers of the fixtures above. (schemathesis' lazy
# `from_fixture` does not run under pytest 9.)
def _spec(name: str) -> dict:
    if name == "envs":
        from services.envs.app import create_app

        return create_app().openapi()
    if name == "teacher":
        from services.teacher.app import create_app
        from services.teacher.settings import TeacherSettings

        return create_app(TeacherSettings(model="unused", store="unused", device="cpu")).openapi()
    from services.trainer.app import create_app
    from services.trainer.status import StatusBoard

    return create_app(StatusBoard(1, "unused", "none")).openapi()


# Routes whose error codes their owner has not declared in the OpenAPI yet (404, 409, 429, ...,
# and the teacher's multipart upload body). Their status codes are checked by a strict xfail
# test of their own; whoever declares them deletes the route here in the same commit.
PENDING: dict[tuple[str, str], str] = {}
# Pydantic's lax mode reads 0 as false and "3" as 3 (models shared with Python clients that pass
# numpy ints); schemathesis counts that as accepting a schema-violating request. Everything else
# is checked: never a 5xx, status codes, content types, bodies and headers as declared.
EXCLUDED = [schemathesis.checks.negative_data_rejection]
# The teacher's bodies carry content a schema cannot describe: "a safetensors file whose LoRA
# tensors fit the base model", "a base64 PNG", "token ids inside this model's vocabulary", "one
# of completion_ids / completion_text". Schema-valid random data there is rightly refused (400,
# 422), so "valid data is accepted" is not checked on these routes; every other check is (no
# 5xx, declared status codes, response bodies and headers).
OPAQUE = {("POST", "/v1/checkpoints"), ("POST", "/v1/logits"), ("POST", "/v1/generate")}
OPAQUE_EXCLUDED = [*EXCLUDED, schemathesis.checks.positive_data_acceptance]


def _excluded(case) -> list:
    return OPAQUE_EXCLUDED if (case.method, case.path) in OPAQUE else EXCLUDED


def _apis(service: str):
    schema = schemathesis.openapi.from_dict(_spec(service))
    pending = [name for (svc, name) in PENDING if svc == service]
    done = schema.exclude(name=pending) if pending else schema
    return done, schema.include(name=pending) if pending else None


env_api, env_pending = _apis("envs")
teacher_api, teacher_pending = _apis("teacher")
trainer_api, _ = _apis("trainer")
XFAIL = pytest.mark.xfail(strict=True, reason="issue 11 §7: route's error codes not declared yet, see PENDING")


@env_api.parametrize()
@FUZZ
def test_env_service_openapi(case, env_url):
    case.call_and_validate(base_url=env_url, excluded_checks=EXCLUDED, timeout=60)


@teacher_api.parametrize()
@FUZZ
def test_teacher_service_openapi(case, teacher_url):
    case.call_and_validate(base_url=teacher_url, excluded_checks=_excluded(case), timeout=60)


@trainer_api.parametrize()
@FUZZ
def test_trainer_service_openapi(case, trainer_url):
    case.call_and_validate(base_url=trainer_url, excluded_checks=EXCLUDED, timeout=60)


if env_pending is not None:
    @XFAIL
    @env_pending.parametrize()
    @FUZZ
    def test_env_service_openapi_pending(case, env_url):
        case.call_and_validate(base_url=env_url, excluded_checks=EXCLUDED, timeout=60)


if teacher_pending is not None:
    @XFAIL
    @teacher_pending.parametrize()
    @FUZZ
    def test_teacher_service_openapi_pending(case, teacher_url):
        case.call_and_validate(base_url=teacher_url, excluded_checks=EXCLUDED, timeout=60)
