"""The teacher service end to end in process: uploads, exact merges, versions, restarts, scoring.

Real components throughout: the tiny Qwen2.5-VL, adapters written by peft's `save_pretrained`,
the FastAPI app through Starlette's TestClient (and uvicorn for the CLI test).
"""

from __future__ import annotations

import copy
import json
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from shared.chat import encode, encode_prompt, token_logprobs
from shared.codecs import image_to_b64
from shared.models import load_model_and_processor, tokenizer_fingerprint
from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.settings import TeacherSettings
from shared.schemas import MergeSettings
from test_teacher_merge import direct_ties

TARGETS = ["q_proj", "v_proj", "down_proj", "qkv"]  # language model and vision tower modules


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, alpha: float = 8.0, rslora: bool = False,
                 targets=TARGETS, rank_pattern=None) -> Path:
    """A LoRA adapter as the trainer writes it: peft + save_pretrained, B randomised (non-zero delta)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_and_processor(model_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                     rank_pattern=rank_pattern or {})
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return out


def peft_deltas(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Each module's delta as peft itself computes it (`get_delta_weight`), keyed by base parameter."""
    from peft import PeftModel

    model, _ = load_model_and_processor(model_dir)
    pm = PeftModel.from_pretrained(model, adapter_dir)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            base_name = name.removeprefix("base_model.model.") + ".weight"
            out[base_name] = mod.get_delta_weight("default").detach().float()
    return out


def chat(img=None, text="You are playing 24 points. What next?"):
    content = ([{"type": "image", "image": image_to_b64(img)}] if img is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


CHATS = [chat(Image.new("RGB", (120, 90), (0, 128, 30))),
         chat(None, "a longer text-only prompt: go to cabinet 10 and look around the room"),
         chat(Image.new("RGB", (60, 150), (200, 10, 0)), "hi")]
COMPLETIONS = [[50, 100, 200, 300], [70, 80], [400, 401, 402, 403, 404, 405]]


def plain_logprobs(model, processor, msgs, ids, temperature=1.0) -> torch.Tensor:
    """One chat, no batching, a plain forward: the reference /v1/logits must equal."""
    single = encode(processor, [encode_prompt(processor, msgs)], [ids])
    with torch.no_grad():
        logits = model(**single.inputs).logits[0]
    n = len(ids)
    return token_logprobs(logits[-n - 1:-1], single.inputs["input_ids"][0, -n:], temperature)


def files(adapter_dir: Path, step: int, **extra):
    return dict(files={"adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
                       "adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes())},
                data={"step": str(step), **extra})


MERGE_FIELDS = set(MergeSettings.model_fields)


def settings(model_dir, store, **kw) -> TeacherSettings:
    """TeacherSettings for a test; merge fields (density=..., method=...) go into `merge`."""
    merge = {"merge_every": 1000, **{k: v for k, v in kw.items() if k in MERGE_FIELDS}}
    rest = {k: v for k, v in kw.items() if k not in MERGE_FIELDS}
    return TeacherSettings(model=str(model_dir), store=str(store), merge=merge, **rest)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, d / "a0", seed=0),
            make_adapter(tiny_model_dir, d / "a1", seed=1, r=8, alpha=16, rslora=True,
                         rank_pattern={"qkv": 2}),
            make_adapter(tiny_model_dir, d / "a2", seed=2, r=4, alpha=4, targets=["q_proj", "o_proj"])]


def logits_body(fp=None, top_k=None, temperature=1.0):
    items = [{"messages": m, "completion_ids": c, **({"top_k": top_k} if top_k else {})}
             for m, c in zip(CHATS, COMPLETIONS, strict=True)]
    return {"items": items, "temperature": temperature, **({"tokenizer_fingerprint": fp} if fp else {})}


def test_logits_equal_plain_forward_with_images_padding_and_topk(tiny_model_dir, tmp_path):
    model, processor = load_model_and_processor(tiny_model_dir)
    fp = tokenizer_fingerprint(processor.tokenizer)
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        assert c.get("/readyz").status_code == 200
        info = c.get("/v1/teacher").json()
        assert info["version"] == 0 and info["backend"] == "hf" and info["tokenizer_fingerprint"] == fp
        for temp in (1.0, 0.7):
            r = c.post("/v1/logits", json=logits_body(fp, top_k=3, temperature=temp))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["teacher_version"] == 0
            for m, ids, item in zip(CHATS, COMPLETIONS, body["items"], strict=True):
                ref = plain_logprobs(model, processor, m, ids, temp)
                assert item["token_ids"] == ids
                assert torch.allclose(torch.tensor(item["logprobs"]), ref, atol=1e-5)
                assert len(item["top_ids"]) == len(ids) and len(item["top_ids"][0]) == 3
                assert item["top_logprobs"][0][0] >= item["top_logprobs"][0][2]
        # completion_text is tokenized by the teacher, without special tokens
        r = c.post("/v1/logits", json={"items": [{"messages": CHATS[1], "completion_text": '{"action": "+"}'}]})
        want = processor.tokenizer('{"action": "+"}', add_special_tokens=False)["input_ids"]
        assert r.json()["items"][0]["token_ids"] == want
        # refusals
        r = c.post("/v1/logits", json=logits_body("0123456789abcdef"))
        assert r.status_code == 409 and r.json()["error"] == "tokenizer_mismatch"
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        r = c.post("/v1/logits", json={"items": [{"messages": CHATS[1], "completion_ids": [5, pad]}]})
        assert r.status_code == 400 and "vision" in r.json()["detail"]
        r = c.post("/v1/logits", json={"items": [{"messages": CHATS[1], "completion_ids": [5, 10**6]}]})
        assert r.status_code == 400 and "vocabulary" in r.json()["detail"]
        bad_img = [{"role": "user", "content": [{"type": "image", "image": "bm90IGFuIGltYWdl"}]}]
        r = c.post("/v1/logits", json={"items": [{"messages": bad_img, "completion_ids": [5]}]})
        assert r.status_code == 400
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store", max_tokens=64))) as c:
        r = c.post("/v1/logits", json=logits_body())
        assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_generate_shift_check_seeds_and_greedy(tiny_model_dir, tmp_path):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        items = [{"messages": CHATS[0], "max_new_tokens": 10, "temperature": 1.0, "seed": 3},
                 {"messages": CHATS[1], "max_new_tokens": 6, "temperature": 1.0, "seed": 4},
                 {"messages": CHATS[2], "max_new_tokens": 5, "temperature": 0.0}]
        r = c.post("/v1/generate", json={"items": items})
        assert r.status_code == 200, r.text
        gen = r.json()
        assert gen["teacher_version"] == 0
        for it, g in zip(items, gen["items"], strict=True):
            assert 0 < len(g["token_ids"]) <= it["max_new_tokens"] and len(g["logprobs"]) == len(g["token_ids"])
        # The shift check: a generated token gets, from /v1/logits, the log-prob it was generated with.
        body = {"items": [{"messages": it["messages"], "completion_ids": g["token_ids"]}
                          for it, g in zip(items, gen["items"], strict=True)]}
        scored = c.post("/v1/logits", json=body).json()
        for g, s in zip(gen["items"], scored["items"], strict=True):
            assert np.allclose(g["logprobs"], s["logprobs"], atol=1e-4)
        # Greedy: each token is the argmax (top-1 of /v1/logits); seeds reproduce, in or out of a batch.
        top = c.post("/v1/logits", json={"items": [{"messages": CHATS[2], "completion_ids": gen["items"][2]["token_ids"],
                                                    "top_k": 1}]}).json()["items"][0]
        assert [t[0] for t in top["top_ids"]] == gen["items"][2]["token_ids"]
        again = c.post("/v1/generate", json={"items": [items[0]]}).json()["items"][0]
        assert again["token_ids"] == gen["items"][0]["token_ids"]
        other = c.post("/v1/generate", json={"items": [{**items[0], "seed": 99}]}).json()["items"][0]
        assert other["token_ids"] != gen["items"][0]["token_ids"]


def _hand_merged_model(model_dir, adapter_dirs, density, weights):
    """A copy of the base whose weights are set to W0 + TIES(peft's own deltas), by hand."""
    model, processor = load_model_and_processor(model_dir)
    per = [peft_deltas(model_dir, a) for a in adapter_dirs]
    params = dict(model.named_parameters())
    names = sorted({n for d in per for n in d})
    with torch.no_grad():
        for n in names:
            ds = [d[n].numpy() if n in d else np.zeros(tuple(params[n].shape), np.float32) for d in per]
            tau = direct_ties(ds, weights, density) if density is not None else sum(w * x for w, x in zip(weights, ds))
            params[n].copy_(params[n] + torch.tensor(tau, dtype=torch.float32))
    return model, processor, names


def test_merged_teacher_equals_hand_merged_copy_and_restart(tiny_model_dir, tmp_path, adapters):
    store = tmp_path / "store"
    with TestClient(create_app(settings(tiny_model_dir, store, density=0.4))) as c:
        base = c.post("/v1/logits", json=logits_body()).json()
        for step, a in enumerate(adapters[:2]):
            r = c.post("/v1/checkpoints", **files(a, step))
            assert r.status_code == 200, r.text
            assert r.json()["merge_scheduled"] is False  # merge_every is 1000 here
        assert c.get("/v1/teacher").json()["version"] == 0
        rep = c.post("/v1/merge").json()
        assert rep["version"] == 1 and len(rep["checkpoints"]) == 2
        for key in ("sign_conflict_fraction", "kept_density", "norm_ratio"):
            assert key in rep["stats"]
        assert 0 < rep["stats"]["kept_density"] < 1
        merged = c.post("/v1/logits", json=logits_body()).json()
        assert merged["teacher_version"] == 1
        # A third checkpoint (different modules), merged again: the version moves on.
        c.post("/v1/checkpoints", **files(adapters[2], 2))
        assert c.post("/v1/merge").json()["version"] == 2
        three = c.post("/v1/logits", json=logits_body()).json()
        assert three["teacher_version"] == 2
    ref_model, processor, names = _hand_merged_model(tiny_model_dir, adapters, 0.4, [1 / 3] * 3)
    assert any(".visual." in n for n in names)  # vision-tower LoRA modules are merged too
    for m, ids, item, b in zip(CHATS, COMPLETIONS, three["items"], base["items"], strict=True):
        ref = plain_logprobs(ref_model, processor, m, ids)
        assert torch.allclose(torch.tensor(item["logprobs"]), ref, atol=1e-5)
        assert not np.allclose(item["logprobs"], b["logprobs"], atol=1e-3)  # the merge changed the teacher
    # Restart on the same store: same version, same logits.
    with TestClient(create_app(settings(tiny_model_dir, store, density=0.4))) as c:
        info = c.get("/v1/teacher").json()
        assert info["version"] == 2 and info["checkpoints"] == 3
        again = c.post("/v1/logits", json=logits_body()).json()
        assert again["teacher_version"] == 2
        for a, b in zip(again["items"], three["items"], strict=True):
            assert np.allclose(a["logprobs"], b["logprobs"], atol=1e-6)


def test_rslora_and_rank_pattern_deltas_match_peft(tiny_model_dir, adapters):
    from services.teacher.adapters import parse_adapter

    backend_shapes = {n: tuple(p.shape) for n, p in load_model_and_processor(tiny_model_dir)[0].named_parameters()}
    a = adapters[1]
    parsed = parse_adapter((a / "adapter_model.safetensors").read_bytes(), (a / "adapter_config.json").read_bytes(),
                           backend_shapes)
    want = peft_deltas(tiny_model_dir, a)
    assert set(parsed.factors) == set(want)
    for n, f in parsed.factors.items():
        assert torch.allclose(f.delta(), want[n], atol=1e-6), n
    qkv = [f for n, f in parsed.factors.items() if n.endswith("qkv.weight")][0]
    assert qkv.A.shape[0] == 2 and qkv.scaling == pytest.approx(16 / 2**0.5)


def test_bad_uploads_refused_and_nothing_stored(tiny_model_dir, tmp_path, adapters):
    from safetensors.torch import load_file, save

    store = tmp_path / "store"
    good_model = (adapters[0] / "adapter_model.safetensors").read_bytes()
    good_cfg = (adapters[0] / "adapter_config.json").read_bytes()
    tensors = load_file(adapters[0] / "adapter_model.safetensors")
    k_a = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    wrong_shape = dict(tensors, **{k_a: torch.randn(4, 65)})
    foreign = {k.replace("q_proj", "xq_proj"): v for k, v in tensors.items()}
    wrong_rank = json.loads(good_cfg)
    wrong_rank["r"] = 8
    wrong_type = json.loads(good_cfg)
    wrong_type["peft_type"] = "IA3"
    int_tensor = dict(tensors, **{k_a: torch.ones(4, 64, dtype=torch.int64)})
    nan_tensor = dict(tensors, **{k_a: torch.full((4, 64), float("nan"))})
    lone_a = {k: v for k, v in tensors.items() if not (k.startswith(k_a.rsplit(".lora_A", 1)[0]) and "lora_B" in k)}
    cases = [
        ("corrupt", b"\x00garbage" * 10, good_cfg, 400),
        ("pickle", pickle.dumps({k: v.numpy() for k, v in tensors.items()}), good_cfg, 400),
        ("wrong shape", save(wrong_shape), good_cfg, 409),
        ("foreign base", save(foreign), good_cfg, 409),
        ("wrong rank", good_model, json.dumps(wrong_rank).encode(), 400),
        ("not lora", good_model, json.dumps(wrong_type).encode(), 400),
        ("bad json", good_model, b"{not json", 400),
        ("int dtype", save(int_tensor), good_cfg, 400),
        ("nan", save(nan_tensor), good_cfg, 400),
        ("A without B", save(lone_a), good_cfg, 400),
    ]
    with TestClient(create_app(settings(tiny_model_dir, store, max_upload_mb=0.05))) as c:
        for name, model_bytes, cfg_bytes, status in cases:
            r = c.post("/v1/checkpoints", files={"adapter_model": ("m", model_bytes), "adapter_config": ("c", cfg_bytes)},
                       data={"step": "1"})
            assert r.status_code == status, (name, r.status_code, r.text)
            assert set(r.json()) == {"error", "detail"}
        r = c.post("/v1/checkpoints", files={"adapter_model": ("m", good_model), "adapter_config": ("c", good_cfg)})
        assert r.status_code == 400 and "step" in r.json()["detail"]
        r = c.post("/v1/checkpoints", **files(adapters[0], 1, base_fingerprint="ffffffffffffffff"))
        assert r.status_code == 409
        big = save({**tensors, "base_model.model.pad.lora_A.weight": torch.zeros(200, 100)})
        r = c.post("/v1/checkpoints", files={"adapter_model": ("m", big), "adapter_config": ("c", good_cfg)},
                   data={"step": "1"})
        assert r.status_code == 413
        assert c.get("/v1/checkpoints").json()["checkpoints"] == []
        assert c.get("/v1/teacher").json()["checkpoints"] == 0
    assert list((store / "checkpoints").iterdir()) == [] and list((store / "tmp").iterdir()) == []


def assert_declared(client, path: str, body, method: str = "get") -> None:
    """Every key of `body` is a property of the route's declared response schema, recursively."""
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def resolve(sch):
        while "$ref" in sch:
            sch = schemas[sch["$ref"].rsplit("/", 1)[-1]]
        return sch

    def check(value, sch, where):
        sch = resolve(sch)
        for alt in sch.get("anyOf", []):
            alt = resolve(alt)
            if value is None and alt.get("type") == "null":
                return
            if isinstance(value, dict) and "properties" in alt:
                return check(value, alt, where)
            if isinstance(value, list) and alt.get("type") == "array":
                return check(value, alt, where)
        if isinstance(value, dict) and "properties" in sch:
            extra = set(value) - set(sch["properties"])
            assert not extra, f"{where}: undeclared fields {sorted(extra)}"
            for k, v in value.items():
                check(v, sch["properties"][k], f"{where}.{k}")
        elif isinstance(value, list) and "items" in sch:
            for i, v in enumerate(value):
                check(v, sch["items"], f"{where}[{i}]")

    ok = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    check(body, ok, path)


def test_background_merge_window_ema_delete(tiny_model_dir, tmp_path, adapters):
    s = settings(tiny_model_dir, tmp_path / "store", merge_every=2, window=2, weighting="ema", ema_alpha=0.5)
    with TestClient(create_app(s)) as c:
        svc = c.app.state.service
        ids = []
        for step, a in enumerate(adapters):
            r = c.post("/v1/checkpoints", **files(a, step)).json()
            ids.append(r["checkpoint_id"])
            assert r["merge_scheduled"] is (step == 1)
            assert svc.wait_idle(30)
        info = c.get("/v1/teacher").json()
        assert info["version"] == 1 and info["last_merge"]["checkpoints"] == ids[:2]
        rep = c.post("/v1/merge").json()
        assert rep["version"] == 2 and rep["checkpoints"] == ids[1:]  # the window: the last two
        assert rep["stats"]["weights"] == pytest.approx([1 / 3, 2 / 3])  # EMA 0.5: age 1, age 0
        listed = c.get("/v1/checkpoints").json()["checkpoints"]
        assert [x["checkpoint_id"] for x in listed] == ids and listed[1]["rank"] == 8
        # Fields the teacher sends are declared in the schema (undeclared ones would be dropped).
        assert (listed[1]["use_rslora"], listed[2]["use_rslora"]) == (True, False)
        assert listed[2]["modules"] == 4  # q_proj, o_proj in both LM layers
        info = c.get("/v1/teacher").json()
        assert info["pending_checkpoints"] == 0 and info["last_merge_error"] is None
        assert_declared(c, "/v1/teacher", info)
        assert_declared(c, "/v1/checkpoints", c.get("/v1/checkpoints").json())
        # A retried upload (same weights, same step) is not stored twice.
        again = c.post("/v1/checkpoints", **files(adapters[2], 2)).json()
        assert again == {"checkpoint_id": ids[2], "merge_scheduled": False}
        assert len(c.get("/v1/checkpoints").json()["checkpoints"]) == 3
        assert c.delete(f"/v1/checkpoints/{ids[2]}").status_code == 200
        assert c.delete(f"/v1/checkpoints/{ids[2]}").status_code == 404
        assert c.post("/v1/merge").json()["checkpoints"] == ids[:2]


def test_merge_method_none_keeps_the_base(tiny_model_dir, tmp_path, adapters):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store", method="none", merge_every=1))) as c:
        base = c.post("/v1/logits", json=logits_body()).json()
        r = c.post("/v1/checkpoints", **files(adapters[0], 0)).json()
        assert r["merge_scheduled"] is False
        rep = c.post("/v1/merge").json()
        assert rep["version"] == 0 and rep["stats"]["method"] == "none"
        assert c.post("/v1/logits", json=logits_body()).json() == base


def test_logits_keep_answering_while_a_merge_runs(tiny_model_dir, tmp_path, adapters, monkeypatch):
    import services.teacher.service as service_mod

    started, release = threading.Event(), threading.Event()
    real = service_mod.merge_adapters

    def slow_merge(*a, **kw):  # the real merge, held open until the test has made its requests
        out = real(*a, **kw)
        started.set()
        assert release.wait(30)
        return out

    monkeypatch.setattr(service_mod, "merge_adapters", slow_merge)
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store", merge_every=1))) as c:
        assert c.post("/v1/checkpoints", **files(adapters[0], 0)).json()["merge_scheduled"] is True
        assert started.wait(30)
        assert c.get("/v1/teacher").json()["merge_running"] is True
        t0 = time.perf_counter()
        for _ in range(3):
            r = c.post("/v1/logits", json=logits_body())
            assert r.status_code == 200 and r.json()["teacher_version"] == 0
        assert time.perf_counter() - t0 < 10
        release.set()
        assert c.app.state.service.wait_idle(30)
        assert c.post("/v1/logits", json=logits_body()).json()["teacher_version"] == 1


def test_swap_is_atomic_under_concurrent_requests(tiny_model_dir):
    """Requests racing with swaps see base or merged logits, never a mix, and the matching version."""
    model, processor = load_model_and_processor(tiny_model_dir)
    backend = HFBackend(tiny_model_dir, loaded=(copy.deepcopy(model), processor))
    from shared.schemas import LogitsItem

    item = LogitsItem(messages=CHATS[0], completion_ids=COMPLETIONS[0])
    names = [n for n in backend.base_parameters() if n.endswith("proj.weight")]
    delta = {n: torch.randn(backend.base_parameters()[n]) * 0.5 for n in names}
    want = {0: backend.logprobs([item])[1][0].logprobs}
    backend.apply_delta(delta, 1)
    want[1] = backend.logprobs([item])[1][0].logprobs
    assert not np.allclose(want[0], want[1], atol=1e-3)
    stop, seen, bad = threading.Event(), set(), []

    def flip():
        v = 1
        while not stop.is_set():
            v = 1 - v
            backend.apply_delta(delta if v else None, v)
            time.sleep(0.002)  # let requests in under both versions

    t = threading.Thread(target=flip)
    t.start()
    try:
        for i in range(400):  # at least 40 requests, more until both versions were served (a busy machine)
            v, res = backend.logprobs([item])
            seen.add(v)
            if not np.allclose(res[0].logprobs, want[v], atol=1e-6):
                bad.append(v)
            if i >= 40 and seen == {0, 1}:
                break
    finally:
        stop.set()
        t.join()
    assert not bad and seen == {0, 1}


def test_mutating_routes_need_the_token_when_set(tiny_model_dir, tmp_path, adapters, monkeypatch):
    monkeypatch.setenv("GTR_API_TOKEN", "s3cret")
    with TestClient(create_app(settings(tiny_model_dir, tmp_path / "store"))) as c:
        assert c.post("/v1/checkpoints", **files(adapters[0], 0)).status_code == 401
        assert c.post("/v1/merge").status_code == 401
        assert c.post("/v1/logits", json=logits_body()).status_code == 200  # reading needs no token
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/checkpoints", headers=auth, **files(adapters[0], 0)).status_code == 200
        assert c.post("/v1/merge", headers=auth).json()["version"] == 1


def test_adapter_names_from_wrappers_and_transformers_4_resolve(tiny_model_dir, adapters):
    from safetensors.torch import load_file, save

    from services.teacher.adapters import parse_adapter

    shapes = {n: tuple(p.shape) for n, p in load_model_and_processor(tiny_model_dir)[0].named_parameters()}
    cfg = (adapters[0] / "adapter_config.json").read_bytes()
    tensors = load_file(adapters[0] / "adapter_model.safetensors")
    want = parse_adapter(save(tensors), cfg, shapes)
    legacy = {k.replace("model.language_model.layers.", "model.layers.").replace("model.model.visual.", "model.visual."): v
              for k, v in tensors.items()}  # transformers 4.x: model.layers.*, visual.*
    wrapped = {k.replace("base_model.model.", "base_model.model.policy.vlm."): v for k, v in tensors.items()}
    for variant in (legacy, wrapped):
        got = parse_adapter(save(variant), cfg, shapes)
        assert set(got.factors) == set(want.factors)
        for n in want.factors:
            assert torch.equal(got.factors[n].B, want.factors[n].B)


def test_restart_after_a_served_checkpoint_was_deleted_builds_a_new_version(tiny_model_dir, tmp_path, adapters):
    store = tmp_path / "store"
    with TestClient(create_app(settings(tiny_model_dir, store))) as c:
        ids = [c.post("/v1/checkpoints", **files(a, i)).json()["checkpoint_id"] for i, a in enumerate(adapters[:2])]
        assert c.post("/v1/merge").json()["version"] == 1
        c.delete(f"/v1/checkpoints/{ids[0]}")
        assert c.get("/v1/teacher").json()["version"] == 1  # still serving until the next merge
    with TestClient(create_app(settings(tiny_model_dir, store))) as c:
        info = c.get("/v1/teacher").json()
        assert info["version"] == 2 and info["last_merge"]["checkpoints"] == [ids[1]]


def test_generation_ignores_the_model_generation_defaults(tiny_model_dir):
    """A model dir whose generation_config asks for a repetition penalty and no repeated tokens
    (as Qwen's ship one) must not reshape what /v1/generate samples and reports."""
    from shared.schemas import GenerateItem, LogitsItem

    model, processor = load_model_and_processor(tiny_model_dir)
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 1
    backend = HFBackend(tiny_model_dir, loaded=(model, processor))
    items = [GenerateItem(messages=CHATS[1], max_new_tokens=12, temperature=0.0),
             GenerateItem(messages=CHATS[0], max_new_tokens=12, temperature=1.0, seed=5)]
    _, gen = backend.generate(items)
    assert len(set(gen[0].token_ids)) < len(gen[0].token_ids)  # greedy repeats here: no hidden penalty
    _, scored = backend.logprobs([LogitsItem(messages=it.messages, completion_ids=g.token_ids)
                                  for it, g in zip(items, gen, strict=True)])
    for g, s in zip(gen, scored, strict=True):
        assert np.allclose(g.logprobs, s.logprobs, atol=1e-4)
