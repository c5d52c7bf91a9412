"""The policy service (DESIGN §3.4) on its `hf` backend, and the trainer's side of it.

Real components: the teacher's app in its `latest` role (uvicorn on a free port, or Starlette's
TestClient), the real env service, the tiny Qwen2.5-VL with peft adapters as the trainer writes
them, and the trainer's own Policy / collect. The vLLM backend's counterparts of these tests are
in tests/vllm_backend/test_policy_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.settings import TeacherSettings
from services.trainer.app import ServerThread
from services.trainer.config import load_train_config
from services.trainer.envpool import EnvPool
from services.trainer.losses import ppo_clip_loss
from services.trainer.policy import Policy
from services.trainer.rollout import collect
from services.trainer.sampler import (LocalSampler, PolicySyncError, ServiceSampler, StalePolicyError, logprob_gap, tis_weights,
                                      weighted_logprob)
from shared.chat import encode_prompt
from shared.client import ServiceClient
from shared.policy_client import PolicyClient
from tests.trainer_services import free_port, running_services

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env_url():
    with running_services(None, None, teacher=False) as (url, _):
        yield url


def _serve(model_dir, store, merge_method="latest"):
    settings = TeacherSettings(model=str(model_dir), store=str(store), merge={"method": merge_method}, device="cpu",
                               dtype="float32")
    port = free_port()
    server = ServerThread(create_app(settings), "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    ServiceClient(url, service="policy").wait_ready(timeout=120)
    return server, url


@pytest.fixture
def policy_url(tiny_model_dir, tmp_path):
    server, url = _serve(tiny_model_dir, tmp_path / "policy-store")
    try:
        yield url
    finally:
        server.stop()


def _cfg(tmp_path, model, env_url, policy_url, *extra):
    return load_train_config(str(ROOT / "configs/tiny-cpu.yaml"), [
        f"model.path={model}", f"env.url={env_url}", f"rollout.url={policy_url}", "rollout.engine=service",
        f"run_dir={tmp_path / 'run'}", "trainer.port=0", "logging.progress=false", "env.num_envs=3",
        "env.num_steps=3", "generation.max_new_tokens=12", *extra])


def _randomise_lora(policy: Policy, seed: int) -> None:
    """Stands in for a PPO update, with a large effect on the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _tokens(rollout) -> list[list[list[int]]]:
    return [[s.tokens for s in row] for row in rollout.steps]


def test_greedy_rollouts_through_the_hf_policy_service_equal_local(tiny_model_dir, env_url, policy_url, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, env_url, policy_url, "model.lora.vision=true")
    policy = Policy(tiny_model_dir, cfg.model, seed=0)
    pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options)
    service = ServiceSampler(policy, cfg.rollout, greedy=True)
    try:
        versions, first = [], None
        for update in (1, 2):
            if update == 2:
                _randomise_lora(policy, seed=1)
            versions.append(service.sync(update - 1)["rollout/policy_version"])
            info = service.client.info()
            assert info.merge.method == "latest" and info.served_checkpoints == [service.checkpoint_id]
            assert info.last_merge.stats.sync == "dense"
            local = collect(policy, pool, cfg, update, sampler=LocalSampler(policy, greedy=True))
            remote = collect(policy, pool, cfg, update, sampler=service)
            assert any(s.image is not None for s in remote.flat())
            assert _tokens(remote) == _tokens(local), f"update {update}: the service's greedy tokens differ"
            assert {s.sampler_version for s in remote.flat()} == {versions[-1]}
            if first is not None:
                assert _tokens(remote) != first, "the pushed update did not change the rollouts"
            first = _tokens(remote)
        assert versions == [1, 2]
    finally:
        service.close()
        pool.close()


def test_a_stale_reply_is_refused_and_a_teacher_url_is_not_a_policy(tiny_model_dir, env_url, policy_url, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, env_url, policy_url)
    policy = Policy(tiny_model_dir, cfg.model, seed=0)
    pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options)
    service = ServiceSampler(policy, cfg.rollout)
    try:
        service.sync(0)
        other = Policy(tiny_model_dir, cfg.model, seed=5)
        _randomise_lora(other, seed=5)
        with PolicyClient(policy_url) as c:
            c.upload_adapter(other.save_adapter(tmp_path / "other"), step=7)
            deadline = time.monotonic() + 60
            while c.info().version <= service.version and time.monotonic() < deadline:
                time.sleep(0.05)
        with pytest.raises(StalePolicyError, match="sampled with adapter version 2, but the trainer synced version 1"):
            collect(policy, pool, cfg, 1, sampler=service)
        # A fresh sync makes it serve the trainer's adapter again (its older twin is re-served, not deduplicated).
        assert service.sync(0)["rollout/policy_version"] == 3
        collect(policy, pool, cfg, 1, sampler=service)
    finally:
        service.close()
        pool.close()
    server, teacher_url = _serve(tiny_model_dir, tmp_path / "teacher-store", merge_method="ties")
    try:
        with pytest.raises(ValueError, match="is a teacher"):
            ServiceSampler(policy, cfg.rollout.model_copy(update={"url": teacher_url}))
    finally:
        server.stop()


def test_latest_serves_the_newest_upload_exactly_and_restores_it(tiny_model_dir, tmp_path):
    """W0 + the newest adapter, no merge: its scores equal the peft model's; newest = last upload
    (whatever its step); a restart serves the same checkpoint again."""
    from peft import PeftModel

    from shared.chat import completion_logprobs, encode
    from shared.models import load_model_and_processor

    cfg = load_train_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "model.lora.vision=true"])
    adapters = []
    for seed in (1, 2):
        p = Policy(tiny_model_dir, cfg.model, seed=seed)
        _randomise_lora(p, seed)
        adapters.append(p.save_adapter(tmp_path / f"a{seed}"))
    settings = TeacherSettings(model=str(tiny_model_dir), store=str(tmp_path / "store"), merge={"method": "latest"},
                               device="cpu", dtype="float32")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Go to 7. Where now?"}]}]
    completion = [50, 60, 70, 80]
    body = {"items": [{"messages": messages, "completion_ids": completion}]}

    def upload(client, adapter, step):
        files = {"adapter_model": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()),
                 "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes())}
        r = client.post("/v1/checkpoints", files=files, data={"step": str(step)})
        assert r.status_code == 200, r.text
        return r.json()["checkpoint_id"]

    with TestClient(create_app(settings, backend=HFBackend(tiny_model_dir, device="cpu", dtype="float32"),
                               background_merges=False)) as c:
        upload(c, adapters[0], step=5)
        newest = upload(c, adapters[1], step=1)  # a lower step, uploaded last: served
        report = c.post("/v1/merge").json()
        info = c.get("/v1/teacher").json()
        assert info["served_checkpoints"] == [newest] and report["stats"]["method"] == "latest"
        served = c.post("/v1/logits", json=body).json()
    model, processor = load_model_and_processor(tiny_model_dir, device="cpu", dtype="float32")
    peft_model = PeftModel.from_pretrained(model, str(adapters[1])).eval()
    batch = encode(processor, [encode_prompt(processor, messages)], [completion])
    with torch.no_grad():
        ref = completion_logprobs(peft_model.base_model.model, batch)[0][0]  # the LoRA layers, unmerged
    assert torch.allclose(torch.tensor(served["items"][0]["logprobs"]), ref, atol=1e-5)
    with TestClient(create_app(settings, backend=HFBackend(tiny_model_dir, device="cpu", dtype="float32"),
                               background_merges=False)) as c:
        again = c.get("/v1/teacher").json()
        assert again["version"] == info["version"] and again["served_checkpoints"] == [newest]
        assert c.post("/v1/logits", json=body).json()["items"][0]["logprobs"] == served["items"][0]["logprobs"]


# ------------------------------------------------------------------ pure math


def test_weighted_logprob_and_gap():
    assert weighted_logprob([-1.0, -2.0, -3.0], n_thought=2, thought_coef=0.5) == pytest.approx(-4.5)

    class S:
        def __init__(self, gap):
            self.sampler_gap = gap

    m = logprob_gap([S([0.001, -0.003]), S(None), S([0.0])])
    assert m == {"rollout/sampler_logprob_gap_mean": pytest.approx(0.004 / 3),
                 "rollout/sampler_logprob_gap_max": pytest.approx(0.003), "rollout/sampler_tokens": 3}
    assert logprob_gap([S(None)]) == {}


def test_truncated_importance_weights():
    old = torch.tensor([-1.0, -2.0, -3.0, -1.0])
    sampler = torch.tensor([-1.5, -1.0, -3.0, math.nan])  # ratios e^0.5, e^-1, 1, no sampler log-prob
    w, m = tis_weights(old, sampler, cap=1.5)
    assert torch.allclose(w, torch.tensor([1.5, math.exp(-1.0), 1.0, 1.0]))
    assert m["ppo/tis_clipped_frac"] == 0.25
    # The weights scale each sample's surrogate: weight 0 removes a sample, weight 1 leaves the plain loss.
    logp, adv = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, -2.0])
    plain, _ = ppo_clip_loss(logp, logp, adv, 0.2)
    only_first, _ = ppo_clip_loss(logp, logp, adv, 0.2, weights=torch.tensor([1.0, 0.0]))
    assert plain == pytest.approx((-1.0 + 2.0) / 2) and only_first == pytest.approx(-1.0 / 2)


def test_policy_cli_is_the_teacher_serve_in_the_latest_role():
    from services.teacher.cli import settings_from_args
    from shared.cli import build_parser

    args = build_parser().parse_args(["policy", "serve", "--model", "m", "--store", "s", "--backend", "vllm",
                                      "--vllm-max-lora-rank", "32"])
    s = settings_from_args(args)
    assert (s.merge.method, s.port, s.backend) == ("latest", 8400, "vllm")
    vllm = s.backend_settings()["vllm"]
    assert (vllm.lora, vllm.max_lora_rank) == (True, 32)
    teacher = settings_from_args(build_parser().parse_args(["teacher", "serve", "--model", "m", "--store", "s",
                                                            "--backend", "vllm"]))
    assert (teacher.merge.method, teacher.port, teacher.backend_settings()["vllm"].lora) == ("ties", 8200, False)


# ------------------------------------------------------------------ deployment


def test_compose_policy_service_follows_rollout_engine():
    from shared.cli import build_parser
    from shared.config import build_config, load_yaml
    from services.trainer.config import TrainConfig
    from tests.test_deploy import compose_config

    plain = compose_config()["services"]
    assert "policy" not in plain and "rollout.engine=local" in plain["trainer"]["command"]
    s = compose_config({"ROLLOUT_ENGINE": "service", "COMPOSE_PROFILES": "policy"})["services"]
    policy, trainer, teacher = s["policy"], s["trainer"], s["teacher"]

    def gpus(svc):
        return [d for dev in svc["deploy"]["resources"]["reservations"]["devices"] for d in dev["device_ids"]]

    assert gpus(policy) == gpus(teacher) == ["1"]  # the teacher's GPU by default ...
    assert gpus(compose_config({"COMPOSE_PROFILES": "policy", "POLICY_GPU": "2"})["services"]["policy"]) == ["2"]
    cmd = policy["command"]
    from services.teacher.cli import settings_from_args

    settings = settings_from_args(build_parser().parse_args(cmd[1:]))
    assert (settings.merge.method, settings.port, settings.backend) == ("latest", 8400, "vllm")
    # ... with memory fractions that fit both engines on it.
    teacher_frac = float(teacher["command"][teacher["command"].index("--vllm-gpu-memory") + 1])
    assert settings.vllm.gpu_memory_utilization + teacher_frac <= 0.9
    assert "8400/readyz" in " ".join(policy["healthcheck"]["test"])
    assert trainer["depends_on"]["policy"] == {"condition": "service_healthy", "required": False}
    sets = trainer["command"][trainer["command"].index("--set") + 1:]
    cfg = build_config(TrainConfig, load_yaml(ROOT / "configs/points24-kl.yaml"), sets)
    assert cfg.rollout.engine == "service" and cfg.rollout.url == "http://policy:8400"


@pytest.mark.slow
def test_gtr_up_starts_the_policy_service_when_the_config_asks(tmp_path, tiny_model_dir):
    """`gtr up` with rollout.engine=service starts `gtr policy serve` (a real process) beside envs and
    teacher, and points the trainer at it; Ctrl-C stops it with the others."""
    import argparse
    import signal
    import subprocess
    import sys

    import httpx

    from services.launcher.cli import up_commands
    from tests.conftest import free_port as port

    ports = {"envs": port(), "teacher": port(), "policy": port()}
    base = ["up", "--model", str(tiny_model_dir), "--device", "cpu", "--run-dir", str(tmp_path), "--env-port",
            str(ports["envs"]), "--teacher-port", str(ports["teacher"]), "--policy-port", str(ports["policy"])]
    from shared.cli import build_parser

    local = up_commands(build_parser().parse_args(base))
    assert "policy" not in local
    cmds = up_commands(build_parser().parse_args(base + ["--set", "rollout.engine=service"]))
    assert cmds["policy"][cmds["policy"].index("serve") - 1] == "policy"
    assert f"rollout.url=http://127.0.0.1:{ports['policy']}" in cmds["trainer"]
    assert isinstance(build_parser().parse_args(base), argparse.Namespace)
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *base, "--no-trainer", "--ready-timeout", "150",
                             "--set", "rollout.engine=service"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 200
        info = None
        while time.time() < deadline and proc.poll() is None:
            try:
                ready = all(httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=2).status_code == 200
                            for p in ports.values())
                if ready:
                    info = httpx.get(f"http://127.0.0.1:{ports['policy']}/v1/teacher", timeout=5).json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert info is not None, proc.stdout.read() if proc.poll() is not None else "services not ready"
        assert info["merge"]["method"] == "latest"
        assert (tmp_path / "logs" / "policy.log").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130  # SIGTERM to the children, 15 s grace, SIGKILL: a margin for a loaded box
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{ports['policy']}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_policy_replicas_share_the_rollout_and_a_dead_one_is_left_out(tiny_model_dir, env_url, tmp_path):
    """Two policy services behind `rollout.url` (#13 "the same holds for policy-service replicas"):
    each gets the adapter and the rollout's batches are spread over both, with the same greedy
    tokens as local sampling. A replica that dies after the sync has its batches re-sent to the
    other; the next sync leaves it out; with none left the sync fails with the reason."""
    import re

    def generates(url):
        import httpx

        text = httpx.get(f"{url}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r'teacher_requests_total\{[^}]*generate[^}]*\} ([0-9.e+]+)', text))

    servers, urls = zip(*[_serve(tiny_model_dir, tmp_path / f"policy-store{i}") for i in range(2)])
    servers = list(servers)
    cfg = _cfg(tmp_path, tiny_model_dir, env_url, ",".join(urls), "rollout.batch_size=1")
    policy = Policy(tiny_model_dir, cfg.model, seed=0)
    _randomise_lora(policy, seed=3)
    pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options)
    service = ServiceSampler(policy, cfg.rollout, greedy=True)
    try:
        m = service.sync(0)
        assert m["rollout/policy_replicas_synced"] == 2 and sorted(service.synced) == [0, 1]
        for url in urls:
            assert PolicyClient(url).info().served_checkpoints == [service.synced[urls.index(url)][1]]
        local = collect(policy, pool, cfg, 1, sampler=LocalSampler(policy, greedy=True))
        remote = collect(policy, pool, cfg, 1, sampler=service)
        assert _tokens(remote) == _tokens(local)
        counts = [generates(u) for u in urls]
        assert min(counts) > 0 and sum(counts) == cfg.env.num_steps * cfg.env.num_envs  # one item per batch, spread

        servers[1].stop()  # dies after the sync: its batches go to replica 0
        assert _tokens(collect(policy, pool, cfg, 1, sampler=service)) == _tokens(local)
        assert sorted(service.synced) == [0]
        m = service.sync(1)  # the next sync leaves it out
        assert m["rollout/policy_replicas_synced"] == 1 and sorted(service.synced) == [0]
        servers[0].stop()
        with pytest.raises(PolicySyncError, match="did not serve the adapter of update 2"):
            service.sync(2)
    finally:
        service.close()
        pool.close()
        for s in servers:
            s.stop()
