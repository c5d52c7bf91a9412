"""What every service's app gets from `shared/server.py`, checked on the three real apps: allowed
hosts (DNS rebinding), no state-changing request from a foreign Origin (a web page in the user's
browser), the token with a non-ASCII header, the error codes in the OpenAPI, /docs offline, and no
publishing beyond loopback without a token (issue 11 §2, §4, §7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared.server import DEFAULT_ALLOWED_HOSTS, check_exposure

ROOT = Path(__file__).resolve().parents[1]


def env_app():
    from services.envs.app import create_app
    from services.envs.settings import EnvServiceSettings

    return create_app(EnvServiceSettings(procs=0))


def teacher_app(model_dir, store):
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    return create_app(TeacherSettings(model=str(model_dir), store=str(store), device="cpu"))


def trainer_app(run_dir):
    from services.trainer.app import create_app
    from services.trainer.status import StatusBoard

    board = StatusBoard(1, str(run_dir), "kl")
    board.loop_alive.set()
    return create_app(board)


# One state-changing route per service that a web page would love to call.
MUTATING = {"envs": ("post", "/v1/sessions", {"env_id": "numberline", "seed": 0}),
            "teacher": ("post", "/v1/merge", None),
            "trainer": ("post", "/v1/stop", None)}


@pytest.fixture(params=["envs", "teacher", "trainer"])
def service(request, tmp_path):
    """(name, app factory): a factory, so that a test can set the environment first."""
    name = request.param
    if name == "envs":
        return name, env_app
    if name == "teacher":
        model_dir = request.getfixturevalue("tiny_model_dir")
        return name, lambda: teacher_app(model_dir, tmp_path / "store")
    return name, lambda: trainer_app(tmp_path)


def client(app, host="127.0.0.1:8000"):
    return TestClient(app, base_url=f"http://{host}", raise_server_exceptions=False)


def test_only_allowed_hosts_are_answered(service):
    name, make = service
    with client(make()) as c:
        for host in ("127.0.0.1:8200", "localhost", "[::1]:8100", f"{name}:8300"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        # A DNS-rebinding page reaches the service under the attacker's own name.
        r = c.get("/healthz", headers={"host": "rebind.attacker.example:8200"})
        assert r.status_code == 400
        assert c.get("/healthz", headers={"host": "127.0.0.1.attacker.example"}).status_code == 400


def test_allowed_hosts_are_configurable(monkeypatch):
    monkeypatch.setenv("GTR_ALLOWED_HOSTS", "gpu-box.lan, *.cluster.internal")
    with client(env_app(), "gpu-box.lan:8100") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "node3.cluster.internal"}).status_code == 200
        assert c.get("/healthz", headers={"host": "localhost:8100"}).status_code == 400
    assert {"localhost", "127.0.0.1", "envs", "teacher", "trainer"} <= set(DEFAULT_ALLOWED_HOSTS)


def test_foreign_origin_cannot_change_state(service):
    name, make = service
    app = make()
    method, path, body = MUTATING[name]
    with client(app) as c:
        r = c.request(method, path, json=body, headers={"origin": "https://evil.example"})
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden_origin" and "evil.example" in r.json()["detail"]
        assert c.request(method, path, json=body, headers={"origin": "null"}).status_code == 403
        # Reading is not refused; the same origin (the service's own /docs page) may write.
        assert c.get("/healthz", headers={"origin": "https://evil.example"}).status_code == 200
        same = c.request(method, path, json=body, headers={"origin": "http://127.0.0.1:8000"})
        assert same.status_code not in (400, 403), same.text
    if name == "trainer":
        assert app.state.board.stop_requested.is_set()  # by the same-origin call only


def test_trusted_origins_are_configurable(monkeypatch):
    monkeypatch.setenv("GTR_ALLOWED_ORIGINS", "http://localhost:3000")
    with client(env_app()) as c:
        r = c.post("/v1/sessions", json={"env_id": "numberline"}, headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200, r.text
        r = c.post("/v1/sessions", json={"env_id": "numberline"}, headers={"origin": "http://localhost:3001"})
        assert r.status_code == 403


@pytest.mark.parametrize("header", [b"Bearer \xe9t\xe9", "Bearer ключ".encode(), b"\xff\xfe"])
def test_non_ascii_authorization_is_401_not_500(service, monkeypatch, header):
    name, make = service
    monkeypatch.setenv("GTR_API_TOKEN", "s3cret")
    method, path, body = MUTATING[name]
    with client(make()) as c:
        r = c.request(method, path, json=body, headers={"authorization": header})
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"


def test_docs_work_offline(service):
    _, make = service
    with client(make()) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "cdn.jsdelivr.net" not in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
        js = c.get("/docs-assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and "SwaggerUIBundle" in js.text
        assert c.get("/docs-assets/swagger-ui.css").status_code == 200


def test_openapi_declares_the_error_bodies_it_sends(service):
    name, make = service
    with client(make()) as c:
        spec = c.get("/openapi.json").json()
        assert "HTTPValidationError" not in spec["components"]["schemas"]
        assert set(spec["components"]["schemas"]["ErrorResponse"]["required"]) == {"error", "detail"}
        for path, item in spec["paths"].items():
            for method, op in item.items():
                codes = op["responses"]
                if "422" in codes:
                    assert codes["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
                if method != "get":
                    assert {"401", "403"} <= set(codes), (method, path)
        # and the 422 really has that shape
        method, path, _ = MUTATING[name]
        if name == "envs":
            r = c.post(path, json={"env_id": 3})
            assert r.status_code == 422 and set(r.json()) == {"error", "detail"}


def test_publishing_beyond_loopback_needs_a_token(monkeypatch, caplog):
    monkeypatch.delenv("GTR_API_TOKEN", raising=False)
    monkeypatch.setenv("GTR_PUBLISH_ADDR", "0.0.0.0")
    with pytest.raises(SystemExit, match="GTR_API_TOKEN"):
        check_exposure("0.0.0.0")
    monkeypatch.setenv("GTR_API_TOKEN", "s3cret")
    check_exposure("0.0.0.0")
    monkeypatch.delenv("GTR_API_TOKEN")
    monkeypatch.setenv("GTR_PUBLISH_ADDR", "127.0.0.1")  # compose's default: the host's loopback only
    check_exposure("0.0.0.0")
    monkeypatch.delenv("GTR_PUBLISH_ADDR")
    check_exposure("127.0.0.1")
    check_exposure("0.0.0.0")
    assert "without GTR_API_TOKEN" in caplog.text


def test_compose_publishing_beyond_loopback_makes_the_service_refuse_to_start(tmp_path):
    """The compose variable reaches the services, and a real service process refuses to start."""
    from test_deploy import compose_config
    from conftest import free_port

    cfg = compose_config({"GTR_PUBLISH_ADDR": "0.0.0.0"})["services"]
    published = [p for svc in cfg.values() for p in svc.get("ports", [])]
    assert len(published) >= 2 and {p["host_ip"] for p in published} == {"0.0.0.0"}  # every published port
    env = {k: v for k, v in os.environ.items() if k != "GTR_API_TOKEN"}
    for svc in ("envs", "teacher", "trainer"):
        assert cfg[svc]["environment"]["GTR_PUBLISH_ADDR"] == "0.0.0.0"
    env["GTR_PUBLISH_ADDR"] = "0.0.0.0"
    out = subprocess.run([sys.executable, "-m", "services.envs", "--host", "0.0.0.0", "--port", str(free_port())],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "set GTR_API_TOKEN" in out.stderr
    default = compose_config()["services"]
    assert {p["host_ip"] for svc in default.values() for p in svc.get("ports", [])} == {"127.0.0.1"}
