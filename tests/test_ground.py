"""Ground floor: tiny model, model loading, chat scoring, config, client, codecs."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel

from shared.chat import completion_logprobs, encode, encode_prompt, token_logprobs
from shared.client import ServiceClient, ServiceError
from shared.codecs import CodecError, b64_to_image, bytes_to_tensors, image_to_b64, tensors_to_bytes
from shared.config import ConfigError, StrictModel, apply_overrides, load_config
from shared.models import load_model_and_processor, tokenizer_fingerprint, vision_token_ids
from shared.tiny_model import build_tiny_model
from fake_http import serve


def _chat(img=None, text="You are playing 24 points."):
    content = ([{"type": "image", "image": image_to_b64(img)}] if img is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def test_tiny_model_is_reproducible(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0, size="tiny")
    other = build_tiny_model(tmp_path / "other", seed=1, size="tiny")

    def digest(d):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}

    assert digest(again) == digest(tiny_model_dir)
    assert digest(other)["model.safetensors"] != digest(tiny_model_dir)["model.safetensors"]


def test_tiny_model_reloads_and_forwards_with_image(tiny_model):
    model, processor = tiny_model
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 400_000
    assert processor.image_processor is not None  # not the tokenizer-only fallback of AutoProcessor
    img = Image.new("RGB", (300, 300), (0, 120, 0))
    enc = encode_prompt(processor, _chat(img))
    assert "pixel_values" in enc and "mm_token_type_ids" in enc
    assert int(enc["mm_token_type_ids"].sum()) > 0  # image positions are marked for 3-D mRoPE
    with torch.no_grad():
        with_types = model(**enc).logits
        without = model(**{k: v for k, v in enc.items() if k != "mm_token_type_ids"}).logits
    assert torch.isfinite(with_types).all()
    # Without mm_token_type_ids, transformers falls back to 1-D positions: logits differ.
    assert not torch.allclose(with_types, without)


def test_generation_suppresses_vision_tokens(tiny_model):
    model, processor = tiny_model
    suppress = vision_token_ids(processor.tokenizer)
    assert len(suppress) == 4
    enc = encode_prompt(processor, _chat(Image.new("RGB", (200, 200), (10, 120, 30))))
    # Make the vision tokens the most likely continuation, then check they are never sampled.
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[suppress] = 50.0
    head = model.get_output_embeddings()
    old = head.bias
    head.bias = torch.nn.Parameter(bias)
    try:
        torch.manual_seed(0)
        out = model.generate(**enc, max_new_tokens=16, do_sample=True, suppress_tokens=suppress)
    finally:
        head.bias = old
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert new and not set(new) & set(suppress)


def test_batched_scoring_equals_plain_forward(tiny_model):
    model, processor = tiny_model
    prompts = [encode_prompt(processor, _chat(Image.new("RGB", (300, 300), (0, 128, 0)))),
               encode_prompt(processor, _chat(None, "a longer text-only prompt, go to cabinet 10 and look")),
               encode_prompt(processor, _chat(Image.new("RGB", (120, 200), (200, 0, 0)), "hi"))]
    comps = [[50, 100, 200, 300], [70, 80], [400, 401, 402, 403, 404, 405]]
    batch = encode(processor, prompts, comps)
    with torch.no_grad():
        lps, tops = completion_logprobs(model, batch, temperature=0.7, top_k=3)
        for i in range(3):
            single = encode(processor, [prompts[i]], [comps[i]])
            logits = model(**single.inputs).logits[0]
            n = len(comps[i])
            ref = token_logprobs(logits[-n - 1:-1], single.inputs["input_ids"][0, -n:], temperature=0.7)
            assert torch.allclose(lps[i], ref, atol=1e-5)
            assert tops[i][0].shape == (n, 3)


def test_tokenizer_fingerprint_stable(tiny_model, tiny_model_dir):
    _, processor = tiny_model
    _, again = load_model_and_processor(tiny_model_dir)
    assert tokenizer_fingerprint(processor.tokenizer) == tokenizer_fingerprint(again.tokenizer)


class _Inner(StrictModel):
    lr: float = 1e-4
    steps: int = 2


class _Cfg(StrictModel):
    name: str = "x"
    inner: _Inner = _Inner()


def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\ninner:\n  lr: 0.001\n")
    cfg = load_config(_Cfg, f, ["inner.steps=5", "name=other"])
    assert cfg.inner.lr == 0.001 and cfg.inner.steps == 5 and cfg.name == "other"


def test_config_unknown_keys_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="inner.lrr"):
        load_config(_Cfg, f)
    with pytest.raises(ConfigError, match="inner.bogus"):
        load_config(_Cfg, None, ["inner.bogus=1"])
    with pytest.raises(ConfigError, match="inner.steps"):
        load_config(_Cfg, None, ["inner.steps=notanint"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_codecs_roundtrip_and_reject():
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    back = np.asarray(b64_to_image(image_to_b64(arr)))
    assert (back == arr).all()
    with pytest.raises(CodecError):
        b64_to_image("not base64 !!")
    with pytest.raises(CodecError):
        b64_to_image(image_to_b64(arr)[:20])
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    back_t = bytes_to_tensors(tensors_to_bytes(t))
    assert torch.equal(back_t["a"], t["a"]) and torch.equal(back_t["b"], t["b"])
    import pickle

    with pytest.raises(CodecError):
        bytes_to_tensors(pickle.dumps(t))


class _Echo(BaseModel):
    value: int


def test_client_retries_then_succeeds():
    calls = {"n": 0}

    def handler(method, path, body):
        calls["n"] += 1
        if calls["n"] < 3:
            return 503, {"error": "not_ready", "detail": "loading"}
        return 200, {"value": 7}

    with serve(handler) as url, ServiceClient(url, service="teacher", backoff=0.01) as c:
        assert c.get("/v1/x", model=_Echo).value == 7
    assert calls["n"] == 3


def test_client_gives_up_with_clear_error(port):
    c = ServiceClient(f"http://127.0.0.1:{port}", service="teacher", retries=2, backoff=0.01, timeout=1)
    with pytest.raises(ServiceError) as e:
        c.post("/v1/logits", json={})
    msg = str(e.value)
    assert "teacher" in msg and "/v1/logits" in msg and "unreachable" in msg


def test_client_does_not_retry_4xx():
    calls = {"n": 0}

    def handler(method, path, body):
        calls["n"] += 1
        return 409, {"error": "conflict", "detail": "tokenizer mismatch"}

    with serve(handler) as url, ServiceClient(url, service="teacher", backoff=0.01) as c:
        with pytest.raises(ServiceError, match="409.*tokenizer mismatch"):
            c.get("/v1/teacher")
    assert calls["n"] == 1


def test_client_survives_an_idle_keep_alive_and_keeps_the_base_path(caplog):
    """uvicorn closes a keep-alive connection after 5 s idle; the next request must not fail on
    it (not even a step, which is never retried)."""
    seen = []

    def handler(method, path, body):
        seen.append((method, path, body))
        return 200, {"value": len(seen)}

    with serve(handler) as url, ServiceClient(url + "/api/", service="envs", retries=0) as c:
        assert c.post("/v1/x", json=_Echo(value=3), model=_Echo).value == 1
        time.sleep(6)
        with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
            assert c.post("/v1/y", json={"a": [1, "é"]}) == {"value": 2}
        assert "Resetting dropped connection" in caplog.text  # the idle connection was closed: reconnected
        assert c.delete("/v1/z") == {"value": 3}
    assert seen == [("POST", "/api/v1/x", {"value": 3}), ("POST", "/api/v1/y", {"a": [1, "é"]}),
                    ("DELETE", "/api/v1/z", None)]


def test_cli_help_lists_commands(capsys):
    from shared.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "tiny-model" in capsys.readouterr().out
