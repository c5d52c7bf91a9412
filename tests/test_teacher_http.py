"""The teacher over real HTTP (uvicorn): the Python client, `gtr teacher query`, and the openai
backend against a local fake of the chat-completions API (the one thing that cannot run here)."""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

from shared.client import ServiceError
from shared.codecs import image_to_b64
from shared.schemas import GenerateItem, GenerateRequest, LogitsItem, LogitsRequest
from shared.teacher_client import TeacherClient
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings
from test_teacher_service import make_adapter


@contextmanager
def running(app, port: int):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_client_and_query_cli_over_http(tiny_model_dir, tmp_path, port, capsys):
    from services.teacher.query import run_query

    adapter = make_adapter(tiny_model_dir, tmp_path / "a0", seed=0)
    s = TeacherSettings(model=str(tiny_model_dir), store=str(tmp_path / "store"), merge={"merge_every": 1})
    png = tmp_path / "card.png"
    Image.new("RGB", (80, 80), (0, 90, 200)).save(png)
    with running(create_app(s), port) as url:
        client = TeacherClient(url, retries=1)
        client.wait_ready(timeout=30)
        up = client.upload_adapter(adapter, step=5)
        assert up.merge_scheduled is True
        deadline = time.monotonic() + 30
        while client.info().version < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        info = client.info()
        assert info.version == 1 and info.checkpoints == 1 and info.last_merge.stats.kept_density > 0
        assert client.checkpoints().checkpoints[0].step == 5
        with pytest.raises(ServiceError, match="409"):
            client.upload_adapter(adapter, step=6, base_fingerprint="not-this-base")
        msgs = [{"role": "user", "content": [{"type": "image", "image": image_to_b64(Image.open(png))},
                                             {"type": "text", "text": "What do you see?"}]}]
        gen = client.generate(GenerateRequest(items=[GenerateItem(messages=msgs, max_new_tokens=6, temperature=0)]))
        assert gen.teacher_version == 1 and gen.items[0].token_ids
        lg = client.logits(LogitsRequest(items=[LogitsItem(messages=msgs, completion_ids=gen.items[0].token_ids)],
                                         tokenizer_fingerprint=info.tokenizer_fingerprint))
        assert lg.items[0].logprobs == pytest.approx(gen.items[0].logprobs, abs=1e-4)
        assert client.merge().version == 2

        def q(*argv):
            ns = argparse.Namespace(url=url, json=False, image=None, top_k=0, temperature=1.0, student=None,
                                    tokenizer=None, max_new_tokens=8, top_p=1.0, seed=0)
            ns.query_command = argv[0]
            for kv in argv[1:]:
                k, v = kv.split("=", 1)
                setattr(ns, k, v)
            out = io.StringIO()
            assert run_query(ns, out) == 0
            return out.getvalue()

        assert '"version": 2' in q("info")
        think = q("think", "prompt=What next?", f"image={png}")
        assert "teacher version 2" in think
        text = q("score", "prompt=What next?", 'completion={"action": "+"}', f"student={tiny_model_dir}")
        lines = text.strip().splitlines()
        assert "student" in lines[1] and "kl(k1)" in lines[1]
        rows = lines[2:-1]
        assert len(rows) >= 3 and "mean k1" in lines[-1]
        # The student is the base, the teacher the merge: their log-probs differ, KL = student - teacher.
        cols = rows[0].split()
        assert float(cols[-1]) == pytest.approx(float(cols[-2]) - float(cols[-3]), abs=2e-4)
        assert "sum teacher log-prob" in q("score", "prompt=hi", "completion=hello")
        assert metrics_has(url, "teacher_requests")


def metrics_has(url: str, name: str) -> bool:
    return name in httpx.get(f"{url}/metrics").text


def fake_openai_app(seen: list) -> FastAPI:
    """A local stand-in for an OpenAI-compatible endpoint: records requests, answers deterministically."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"data": [{"id": "gpt-fake"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization")})
        parts = body["messages"][-1]["content"]
        n_images = sum(1 for p in parts if isinstance(p, dict) and p.get("type") == "image_url")
        text = f'{{"thoughts": "I see {n_images} image(s)", "action": "+"}}'
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": None, "top_logprobs": []},
                                                      {"token": "b", "logprob": -1.25, "bytes": None, "top_logprobs": []}]}}]}

    return app


def test_openai_backend_against_a_fake_api(tmp_path, monkeypatch):
    from conftest import free_port

    seen: list = []
    fake_port = free_port()
    teacher_port = free_port()
    monkeypatch.setenv("GTR_TEST_OPENAI_KEY", "sk-test")
    with running(fake_openai_app(seen), fake_port) as fake_url:
        s = TeacherSettings(backend="openai", model="gpt-fake", store=str(tmp_path / "store"),
                            openai_base_url=f"{fake_url}/v1", openai_api_key_env="GTR_TEST_OPENAI_KEY")
        with running(create_app(s), teacher_port) as url:
            client = TeacherClient(url, retries=0)
            client.wait_ready(timeout=20)
            assert client.info().backend == "openai"
            img = image_to_b64(Image.new("RGB", (20, 20), (255, 0, 0)))
            msgs = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "24?"}]}]
            gen = client.generate(GenerateRequest(items=[
                GenerateItem(messages=msgs, max_new_tokens=32, temperature=0.3, top_p=0.9, seed=7),
                GenerateItem(messages=[{"role": "user", "content": "text only"}], max_new_tokens=8)]))
            assert gen.teacher_version == 0
            assert gen.items[0].text == '{"thoughts": "I see 1 image(s)", "action": "+"}'
            assert gen.items[0].logprobs == [-0.5, -1.25]
            assert "I see 0 image(s)" in gen.items[1].text
            first = next(x for x in seen if x["body"]["max_tokens"] == 32)
            assert first["auth"] == "Bearer sk-test"
            b = first["body"]
            assert b["model"] == "gpt-fake" and b["temperature"] == 0.3 and b["top_p"] == 0.9 and b["seed"] == 7
            url_part = b["messages"][1]["content"][0]
            assert url_part["type"] == "image_url"
            assert url_part["image_url"]["url"] == f"data:image/png;base64,{img}"
            assert base64.b64decode(url_part["image_url"]["url"].split(",", 1)[1])[:4] == b"\x89PNG"
            with pytest.raises(ServiceError) as e:
                client.logits(LogitsRequest(items=[LogitsItem(messages=msgs, completion_text="x")]))
            assert e.value.status == 501
            with pytest.raises(ServiceError) as e:
                client.upload_bytes(b"x", b"{}", step=1)
            assert e.value.status == 501
    # The fake is gone: the teacher reports the upstream failure as 502, never 500.
    with running(create_app(s), teacher_port) as url:
        client = TeacherClient(url, retries=0)
        with pytest.raises(ServiceError) as e:
            client.generate(GenerateRequest(items=[GenerateItem(messages=msgs, max_new_tokens=4)]))
        assert e.value.status == 502
        assert httpx.get(url + "/readyz").status_code == 503


def test_python_dash_m_serves_with_the_cli_flags(tiny_model_dir, tmp_path, port):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "services.teacher", "--backend", "hf", "--model", str(tiny_model_dir),
           "--store", str(tmp_path / "store"), "--device", "cpu", "--merge-method", "ties", "--density", "0.3",
           "--weighting", "ema", "--ema-alpha", "0.2", "--window", "4", "--merge-every", "2", "--scale", "0.5",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = TeacherClient(f"http://127.0.0.1:{port}", retries=0)
        client.wait_ready(timeout=60)
        m = client.info().merge
        assert (m.method, m.density, m.weighting, m.ema_alpha, m.window, m.merge_every, m.scale) == \
            ("ties", 0.3, "ema", 0.2, 4, 2, 0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "services.teacher", "--model", str(tiny_model_dir), "--store",
                          str(tmp_path / "s2"), "--density", "1.5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "density" in bad.stderr
