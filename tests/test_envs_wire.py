"""The env service's JSON is the shared schemas': every route's reply checked against its own
/openapi.json response schema, with no key the schema does not declare."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest

from tests.test_envs_service import Server, act


def _strict(schema):
    """The schema with `additionalProperties: false` on every object that lists its properties
    (our response models ignore extras on the client side; the server must send none)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def served():
    from tests.conftest import free_port

    with Server(free_port(), max_sessions=16, ttl_s=600, procs=1) as s:
        spec = httpx.get(s.url + "/openapi.json").json()
        yield s.url, spec


def check(spec, method: str, path: str, response: httpx.Response) -> None:
    declared = spec["paths"][path][method]["responses"][str(response.status_code)]
    schema = declared["content"]["application/json"]["schema"]
    validator = jsonschema_rs.validator_for(_strict({**schema, "components": spec["components"]}))
    errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(response.json())]
    assert not errors, f"{method.upper()} {path} {response.status_code}: {errors[:5]}"


def test_every_env_route_answers_what_its_openapi_declares(served):
    url, spec = served
    calls = []

    def call(method, path, route=None, **kw):
        r = getattr(httpx, method)(url + (route or path), timeout=120, **kw)
        calls.append((method, path, r.status_code))
        check(spec, method, path, r)
        return r

    call("get", "/healthz")
    call("get", "/readyz")
    call("get", "/v1/envs")
    for env_id in ("points24", "numberline", "alfworld"):
        sid = call("post", "/v1/sessions", json={"env_id": env_id, "seed": 1}).json()["session_id"]
        call("post", "/v1/sessions/{session_id}/step", f"/v1/sessions/{sid}/step", json={"action": act("(")})
        call("post", "/v1/sessions/{session_id}/reset", f"/v1/sessions/{sid}/reset", json={"seed": 2})
        call("post", "/v1/step", json={"steps": [{"session_id": sid, "action": act("=")}], "auto_reset": True})
        call("delete", "/v1/sessions/{session_id}", f"/v1/sessions/{sid}")
    sid = call("post", "/v1/sessions", json={"env_id": "points24", "seed": 1}).json()["session_id"]
    out = call("post", "/v1/step", json={"steps": [{"session_id": sid, "action": act("=")},
                                                   {"session_id": "nope", "action": "x"}], "auto_reset": True}).json()
    assert out[0]["reset"]["observation"]["image"] and out[1]["error"]["error"] == "unknown_session"
    # the error answers, each declared on its route
    call("post", "/v1/sessions", json={"env_id": "chess"})
    call("post", "/v1/sessions", json={"env_id": "points24", "seed": -1})
    call("post", "/v1/sessions", json={"env_id": "alfworld-thor"})
    call("post", "/v1/sessions/{session_id}/step", "/v1/sessions/nope/step", json={"action": "x"})
    call("post", "/v1/sessions/{session_id}/reset", "/v1/sessions/nope/reset", json={})
    call("delete", "/v1/sessions/{session_id}", "/v1/sessions/nope")
    call("post", "/v1/step", json={"steps": [{"session_id": sid, "action": "x"}] * 1025})
    call("post", "/v1/sessions/{session_id}/step", f"/v1/sessions/{sid}/step", json={"action": act("=")})
    call("post", "/v1/sessions/{session_id}/step", f"/v1/sessions/{sid}/step", json={"action": act("=")})
    codes = {c for _, _, c in calls}
    assert {200, 404, 409, 413, 422, 501} <= codes, codes


def test_the_openapi_declares_each_env_routes_error_codes(served):
    _, spec = served
    declared = {(m, p): set(op["responses"]) for p, item in spec["paths"].items() for m, op in item.items()}
    assert {"404", "409", "422", "429", "501"} <= declared[("post", "/v1/sessions")]
    assert {"404", "409", "422"} <= declared[("post", "/v1/sessions/{session_id}/step")]
    assert {"404", "409", "422"} <= declared[("post", "/v1/sessions/{session_id}/reset")]
    assert {"413", "422"} <= declared[("post", "/v1/step")]
    assert {"404"} <= declared[("delete", "/v1/sessions/{session_id}")]
    assert {"503"} <= declared[("get", "/readyz")]
    assert json.dumps(spec).count("data_path") == 0
