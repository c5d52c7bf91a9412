"""Issue 11 §2: the hand-crafted corpus of client input that once answered 500. Each case must
answer a 4xx with the JSON error body and a message, on the real apps (env service with a worker
process, teacher on the tiny model). The fuzzer (test_fuzz_openapi.py) covers what the schema
allows; these are the inputs it would not find by itself. The non-ASCII Authorization header is
in test_server_guards.py (every service)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shared.codecs import image_to_b64

# Cases whose fix has not landed yet, by owner. Strict: a fixed case XPASSes and fails the suite,
# so whoever lands the fix deletes its id here in the same commit.
TEACHER = "teacher helper (wt/teacher)"
PENDING: dict[str, str] = {}


def cases(*ids: str):
    """pytest params named `ids`, each marked xfail(strict=True) while its fix is pending."""
    return [pytest.param(i, id=i, marks=[pytest.mark.xfail(strict=True, reason=f"issue 11 §2: to be fixed by {PENDING[i]}")]
                         if i in PENDING else []) for i in ids]


def routes(case_ids):
    return cases(*(f"{c}-{r}" for c in case_ids for r in ("logits", "generate")))


# --------------------------------------------------------------------------- helpers


def assert_client_error(r, *codes: int):
    """A 4xx (one of `codes` when given) with the service's JSON error body and a message."""
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if codes:
        assert r.status_code in codes, f"{r.status_code}: {r.text[:300]}"
    body = r.json()
    assert set(body) >= {"error", "detail"} and body["detail"], body


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A PNG whose header says side x side greyscale pixels (400M for 20000): the IDAT holds the
    first rows only, so the file is small; a server must refuse it from the header."""
    rows = zlib.compress(b"\x00" * (side + 1) * 8)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))


def png_with_text_chunk(mb: int = 20) -> bytes:
    """A valid 8x8 PNG plus a zTXt chunk that inflates to `mb` MB."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = buf.getvalue()
    ztxt = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * (mb << 20), 9))
    return png[:-12] + ztxt + png[-12:]  # before IEND


def png_of(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def chat(text: str = "What is 3*8?", image: bytes | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image_to_b64(image) if isinstance(image, Image.Image)
                           else __import__("base64").b64encode(image).decode()})
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, tmp_path_factory):
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    settings = TeacherSettings(model=str(tiny_model_dir), store=str(tmp_path_factory.mktemp("store")), device="cpu")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir, tmp_path_factory):
    from test_teacher_service import make_adapter

    d = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=1)
    return (d / "adapter_model.safetensors").read_bytes(), json.loads((d / "adapter_config.json").read_text())


def logits(teacher, messages, **extra):
    return teacher.post("/v1/logits", json={"items": [{"messages": messages, "completion_text": '{"action": "+"}'}],
                                            **extra})


def generate(teacher, messages, **item):
    return teacher.post("/v1/generate", json={"items": [{"messages": messages, "max_new_tokens": 4, **item}]})


IMAGES = {
    "decompression-bomb-20000x20000": png_bomb,
    "aspect-ratio-4000x1": lambda: png_of(4000, 1),
    "20MB-compressed-text-chunk": png_with_text_chunk,
}


@pytest.mark.parametrize("case_route", routes(IMAGES))
def test_teacher_refuses_bad_images(teacher, case_route):
    case, route = case_route.rsplit("-", 1)
    messages = chat("Describe the image.", IMAGES[case]())
    r = logits(teacher, messages) if route == "logits" else generate(teacher, messages)
    assert_client_error(r)


TEXTS = {
    "image-pad-token-in-text": ("look: <|image_pad|>", False),
    "vision-start-token-in-text": ("look: <|vision_start|><|vision_end|>", False),
    "vision-tokens-in-text-with-an-image": ("<|vision_start|><|image_pad|><|vision_end|> again", True),
}


@pytest.mark.parametrize("case_route", routes(TEXTS))
def test_teacher_refuses_vision_tokens_in_text(teacher, case_route):
    case, route = case_route.rsplit("-", 1)
    text, with_image = TEXTS[case]
    messages = chat(text, png_of(28, 28) if with_image else None)
    r = logits(teacher, messages) if route == "logits" else generate(teacher, messages)
    assert_client_error(r)


@pytest.mark.parametrize("case_route", routes(["lone-surrogate"]))
def test_teacher_refuses_a_lone_surrogate(teacher, case_route):
    route = case_route.rsplit("-", 1)[1]
    body = ('{"items": [{"messages": [{"role": "user", "content": [{"type": "text", "text": "a \\ud800 b"}]}], '
            + ('"completion_text": "x"}]}' if route == "logits" else '"max_new_tokens": 4}]}'))
    r = teacher.post(f"/v1/{route}", content=body, headers={"content-type": "application/json"})
    assert_client_error(r)


@pytest.mark.parametrize("case", cases("vanishing-temperature"))
def test_teacher_refuses_a_vanishing_temperature(teacher, case):
    assert_client_error(generate(teacher, chat(), temperature=1e-45))
    r = logits(teacher, chat(), temperature=1e-45)
    assert_client_error(r)  # once answered 200 with null log-probs


@pytest.mark.parametrize("case", cases("seed-2**64", "seed--1"))
def test_teacher_refuses_seeds_outside_the_generator_range(teacher, case):
    seed = {"seed-2**64": 2**64, "seed--1": -1}[case]
    assert_client_error(generate(teacher, chat(), seed=seed, temperature=1.0))


def _deep_json(depth: int) -> str:
    return '{"r": 4, "x": ' + "[" * depth + "]" * depth + "}"


CONFIGS = {
    "alpha_pattern-value-a-string": lambda cfg: json.dumps({**cfg, "alpha_pattern": {"q_proj": "eight"}}),
    "rank_pattern-key-not-a-regex": lambda cfg: json.dumps({**cfg, "rank_pattern": {"q_proj[(": 4}}),
    "json-nested-100k-deep": lambda cfg: _deep_json(100_000),
}


@pytest.mark.parametrize("case", cases(*CONFIGS))
def test_teacher_refuses_bad_adapter_configs(teacher, adapter_files, case):
    weights, cfg = adapter_files
    before = teacher.get("/v1/checkpoints").json()["checkpoints"]
    r = teacher.post("/v1/checkpoints", data={"step": "1"},
                     files={"adapter_model": ("adapter_model.safetensors", weights),
                            "adapter_config": ("adapter_config.json", CONFIGS[case](cfg).encode())})
    assert_client_error(r)
    assert teacher.get("/v1/checkpoints").json()["checkpoints"] == before  # nothing stored


# --------------------------------------------------------------------------- env service


@pytest.fixture(scope="module")
def envs():
    from services.envs.app import create_app
    from services.envs.settings import EnvServiceSettings

    # One worker process: the deep-options case failed while being pickled to it.
    with TestClient(create_app(EnvServiceSettings(procs=1, max_sessions=16)), raise_server_exceptions=False) as c:
        yield c


def _nested(depth: int):
    out: dict = {}
    for _ in range(depth):
        out = {"a": out}
    return out


ENV_OPTIONS = {
    "options-nested-900-deep": ("points24", {"deep": _nested(900)}),
    "alfworld-task_types-nested-list": ("alfworld", {"task_types": [[1]]}),
    "alfworld-data_path-not-a-string": ("alfworld", {"data_path": 5}),
}


@pytest.mark.parametrize("case", cases(*ENV_OPTIONS))
def test_env_refuses_bad_options(envs, case):
    env_id, options = ENV_OPTIONS[case]
    r = envs.post("/v1/sessions", json={"env_id": env_id, "seed": 0, "options": options})
    assert_client_error(r)
    # the service carries on
    assert envs.post("/v1/sessions", json={"env_id": "numberline", "seed": 0}).status_code == 200
