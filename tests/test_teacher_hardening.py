"""Issue 11 for the teacher: no poisoned teacher, bounded uploads and prompts, never a NaN log-prob.

Real components: the FastAPI app on the tiny model, peft-written adapters, the checkpoint store
on disk. Each test names the guard it pins.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from services.teacher import adapters as adapters_mod
from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from test_teacher_service import CHATS, logits_body, make_adapter, settings


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory):
    d = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("good") / "a", seed=3)
    return (d / "adapter_model.safetensors").read_bytes(), json.loads((d / "adapter_config.json").read_text())


def upload(c, weights: bytes, cfg: dict | str, step: int):
    body = cfg if isinstance(cfg, str) else json.dumps(cfg)
    return c.post("/v1/checkpoints", data={"step": str(step)},
                  files={"adapter_model": ("adapter_model.safetensors", weights),
                         "adapter_config": ("adapter_config.json", body.encode())})


def scaled(weights: bytes, factor: float) -> bytes:
    return save({k: v * factor for k, v in load(weights).items()})


POISON = {
    "lora_alpha-1e300": lambda w, cfg: (w, {**cfg, "lora_alpha": 1e300}),
    "alpha_pattern-NaN": lambda w, cfg: (w, json.dumps({**cfg, "alpha_pattern": {"q_proj": float("nan")}})),
    "rank_pattern-0": lambda w, cfg: (w, {**cfg, "rank_pattern": {"q_proj": 0}}),
    "tensors-1e30": lambda w, cfg: (scaled(w, 1e30), cfg),
}


@pytest.mark.parametrize("case", list(POISON))
def test_poisoned_uploads_are_refused_and_nothing_stored(tiny_model_dir, tmp_path, good, case):
    weights, cfg = POISON[case](*good)
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        r = upload(c, weights, cfg, 1)
        assert r.status_code == 400 and r.json()["error"] == "bad_adapter", r.text
        assert c.get("/v1/checkpoints").json()["checkpoints"] == []


def test_the_dedup_key_covers_the_config(tiny_model_dir, tmp_path, good):
    weights, cfg = good
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        first = upload(c, weights, cfg, 1).json()["checkpoint_id"]
        assert upload(c, weights, cfg, 1).json()["checkpoint_id"] == first  # a retried upload
        other = upload(c, weights, {**cfg, "lora_alpha": cfg["lora_alpha"] * 2}, 1).json()["checkpoint_id"]
        assert other != first and len(c.get("/v1/checkpoints").json()["checkpoints"]) == 2


@pytest.mark.parametrize("factor, reason", [(1e30, "delta is not finite"), (1e18, "probe forward")])
def test_a_merge_that_is_not_finite_is_refused_and_the_previous_version_serves(
        tiny_model_dir, tmp_path, good, monkeypatch, factor, reason):
    weights, cfg = good
    # Uploads this large are refused at the door; open it, to pin the guard behind it.
    monkeypatch.setattr(adapters_mod, "MAX_WEIGHT", math.inf)
    store = tmp_path / "store"
    with TestClient(create_app(settings(tiny_model_dir, store))) as c:
        assert upload(c, weights, cfg, 1).status_code == 200
        assert c.post("/v1/merge").json()["version"] == 1
        before = c.post("/v1/logits", json=logits_body()).json()
        bad_id = upload(c, scaled(weights, factor), cfg, 2).json()["checkpoint_id"]
        r = c.post("/v1/merge")
        assert r.status_code == 409 and r.json()["error"] == "merge_refused", r.text
        assert reason in r.json()["detail"]
        info = c.get("/v1/teacher").json()
        assert info["version"] == 1 and info["refused_merges"] == 1
        assert reason in info["last_refused_merge"]["reason"] and bad_id in info["last_refused_merge"]["checkpoints"]
        after = c.post("/v1/logits", json=logits_body()).json()
        assert after == before  # the previous weights, bit for bit
        listed = {x["checkpoint_id"]: x for x in c.get("/v1/checkpoints").json()["checkpoints"]}
        assert listed[bad_id]["refused"] is True
        # The refused checkpoint is left out: the next upload merges again.
        assert upload(c, weights, {**cfg, "lora_alpha": 4.0}, 3).status_code == 200
        rep = c.post("/v1/merge").json()
        assert rep["version"] == 2 and bad_id not in rep["checkpoints"]
    with TestClient(create_app(settings(tiny_model_dir, store))) as c:  # a restart rebuilds version 2
        assert c.get("/v1/teacher").json()["version"] == 2


def test_a_recorded_version_that_fails_todays_checks_does_not_come_back(tiny_model_dir, tmp_path, good,
                                                                        monkeypatch):
    weights, cfg = good
    store = tmp_path / "store"
    with monkeypatch.context() as m:  # a store written before the upload and merge checks existed
        m.setattr(adapters_mod, "MAX_ALPHA", math.inf)
        m.setattr(HFBackend, "_probe", lambda self: None)
        with TestClient(create_app(settings(tiny_model_dir, store))) as c:
            assert upload(c, weights, {**cfg, "lora_alpha": 1e30}, 1).status_code == 200
            assert c.post("/v1/merge").json()["version"] == 1
    with TestClient(create_app(settings(tiny_model_dir, store))) as c:
        info = c.get("/v1/teacher").json()
        assert info["version"] == 2 and info["refused_merges"] == 1
        body = c.post("/v1/logits", json=logits_body()).json()
        assert all(math.isfinite(v) for it in body["items"] for v in it["logprobs"])


def test_a_non_finite_log_prob_is_an_error_never_a_null(tiny_model_dir, tmp_path):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store")), raise_server_exceptions=False) as c:
        head = c.app.state.service.backend.model.get_output_embeddings()
        with torch.no_grad():
            head.weight[7].fill_(float("nan"))
        r = c.post("/v1/logits", json=logits_body())
        assert r.status_code == 503 and r.json()["error"] == "non_finite", r.text
        r = c.post("/v1/generate", json={"items": [{"messages": CHATS[1], "max_new_tokens": 3, "seed": 1}]})
        assert r.status_code == 503 and r.json()["error"] == "non_finite", r.text


def test_a_10mb_prompt_is_refused_before_tokenising(tiny_model_dir, tmp_path):
    big = "x" * (10 << 20)
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        for route, item in (("logits", {"completion_ids": [1]}), ("generate", {"max_new_tokens": 2})):
            r = c.post(f"/v1/{route}", json={"items": [{"messages": [{"role": "user", "content": big}], **item}]})
            assert r.status_code == 413 and "bytes" in r.json()["detail"], r.text
        r = c.post("/v1/logits", json={"items": [{"messages": CHATS[1], "completion_text": big}]})
        assert r.status_code == 413 and "completion_text" in r.json()["detail"], r.text


def test_an_upload_over_the_limit_stops_being_read_at_the_limit():
    import asyncio

    from starlette.datastructures import Headers

    from services.teacher.app import MULTIPART_OVERHEAD, read_upload
    from services.teacher.errors import TooLarge

    mb = 1 << 20
    read = 0

    async def body():  # a chunked 64 MB upload without a Content-Length
        nonlocal read
        yield b'--b\r\nContent-Disposition: form-data; name="adapter_model"; filename="a"\r\n\r\n'
        for _ in range(64):
            read += mb
            yield b"\0" * mb

    headers = Headers({"content-type": "multipart/form-data; boundary=b"})
    with pytest.raises(TooLarge):
        asyncio.run(read_upload(headers, body(), 4 * mb))
    assert read <= 4 * mb + MULTIPART_OVERHEAD + mb  # stopped at the limit, not after 64 MB


def test_the_openapi_declares_the_upload_body_and_the_error_codes(tiny_model_dir, tmp_path):
    spec = create_app(settings(tiny_model_dir, tmp_path / "store")).openapi()  # no model loaded for this
    upload_op = spec["paths"]["/v1/checkpoints"]["post"]
    form = upload_op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["required"]) == {"adapter_model", "adapter_config", "step"}
    assert form["properties"]["adapter_model"]["format"] == "binary"
    declared = {(p, m): set(op["responses"]) for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert {"400", "409", "413", "501", "507"} <= declared[("/v1/checkpoints", "post")]
    assert {"400", "409", "413", "501", "503"} <= declared[("/v1/logits", "post")]
    assert {"400", "413", "502", "503"} <= declared[("/v1/generate", "post")]
    assert {"404"} <= declared[("/v1/checkpoints/{checkpoint_id}", "delete")]
    assert {"409"} <= declared[("/v1/merge", "post")]


def test_a_backend_without_its_own_probe_is_probed_after_the_swap_and_rolled_back(
        tiny_model_dir, tmp_path, good, monkeypatch):
    """vLLM cannot probe before its in-place reload: the service probes right after and, on a
    non-finite result, restores the previous version's weights (here: hf with its probe off)."""
    weights, cfg = good
    monkeypatch.setattr(adapters_mod, "MAX_WEIGHT", math.inf)
    monkeypatch.setattr(HFBackend, "probes_before_swap", False)
    monkeypatch.setattr(HFBackend, "_probe", lambda self: None)
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        assert upload(c, weights, cfg, 1).status_code == 200
        assert c.post("/v1/merge").json()["version"] == 1
        before = c.post("/v1/logits", json=logits_body()).json()
        assert upload(c, scaled(weights, 1e18), cfg, 2).status_code == 200
        r = c.post("/v1/merge")
        assert r.status_code == 409 and "probe request" in r.json()["detail"], r.text
        assert c.get("/v1/teacher").json()["version"] == 1
        assert c.post("/v1/logits", json=logits_body()).json() == before  # rolled back, bit for bit
