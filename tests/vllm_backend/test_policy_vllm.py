"""The policy service on vLLM (DESIGN §3.4): the trainer's rollouts sampled by a vLLM engine that
the trainer syncs its LoRA adapter into.

Runs only in .venv-vllm (`make test-vllm`). Real components throughout: one vLLM engine (the
CPU build, multiprocess as deployed) behind the real policy app served by uvicorn, the real env
service, the trainer's own Policy (transformers + peft, fp32), and for the end-to-end run a real
hf teacher service. The model is the head_dim-32 tiny Qwen2.5-VL that vLLM's CPU attention takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM policy test runs in .venv-vllm: make test-vllm")

import torch  # noqa: E402

from services.teacher.app import create_app  # noqa: E402
from services.teacher.backends.vllm import VLLMBackend  # noqa: E402
from services.teacher.settings import TeacherSettings  # noqa: E402
from services.trainer.app import ServerThread  # noqa: E402
from services.trainer.config import load_train_config  # noqa: E402
from services.trainer.envpool import EnvPool  # noqa: E402
from services.trainer.policy import Policy  # noqa: E402
from services.trainer.rollout import collect  # noqa: E402
from services.trainer.sampler import LocalSampler, ServiceSampler, StalePolicyError, logprob_gap  # noqa: E402
from services.trainer.train import train  # noqa: E402
from shared.client import ServiceClient  # noqa: E402
from shared.policy_client import PolicyClient  # noqa: E402
from tests.trainer_services import free_port, running_services  # noqa: E402
from vllm_testing import build_tiny_vl  # noqa: E402  (tests/vllm_backend/)

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-3  # nats, the bar for sampled tokens (fp32 on CPU)
ENGINE = dict(max_model_len=1024, enforce_eager=True, engine_kwargs={"kv_cache_memory_bytes": 64 << 20})


class Lent:
    """The module's engine lent to an app: the app's shutdown leaves it running."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return build_tiny_vl(tmp_path_factory.mktemp("models") / "vl", seed=0)


@pytest.fixture(scope="module")
def engine(vl_dir):
    be = VLLMBackend(vl_dir, dtype="float32", vllm=dict(ENGINE, lora=True, max_lora_rank=16))
    yield be
    be.close()


@pytest.fixture(scope="module")
def env_url():
    with running_services(None, None, teacher=False) as (url, _):
        yield url


@pytest.fixture
def policy_url(vl_dir, engine, tmp_path):
    """A fresh policy app (empty store) on the shared engine, reset to W0 first."""
    engine.apply_delta(None, 0)
    settings = TeacherSettings(backend="vllm", model=str(vl_dir), store=str(tmp_path / "policy-store"),
                               merge={"method": "latest"}, dtype="float32")
    port = free_port()
    server = ServerThread(create_app(settings, backend=Lent(engine)), "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    ServiceClient(url, service="policy").wait_ready(timeout=120)
    try:
        yield url
    finally:
        server.stop()


def _cfg(tmp_path, model, env_url, policy_url, *extra):
    return load_train_config(str(ROOT / "configs/tiny-cpu.yaml"), [
        f"model.path={model}", f"env.url={env_url}", f"rollout.url={policy_url}", "rollout.engine=service",
        f"run_dir={tmp_path / 'run'}", "trainer.port=0", "logging.progress=false", "logging.tensorboard=false",
        "env.num_envs=3", "env.num_steps=3", "generation.max_new_tokens=12", "model.lora.r=4",
        "model.lora.alpha=8", *extra])


def _randomise_lora(policy: Policy, seed: int) -> None:
    """Stands in for a PPO update, with a large effect on the outputs (A and B both random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _tokens(rollout) -> list[list[list[int]]]:
    return [[s.tokens for s in row] for row in rollout.steps]


def test_greedy_rollouts_equal_the_trainers_local_ones(vl_dir, env_url, policy_url, tmp_path):
    """Token for token, multi-turn with images, at version 0 and after an update was pushed; the
    adapter's vision-tower modules go through the dense fallback, the rest through vLLM's LoRA."""
    cfg = _cfg(tmp_path, vl_dir, env_url, policy_url, "model.lora.vision=true")
    policy = Policy(vl_dir, cfg.model, seed=0)
    pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options)
    service = ServiceSampler(policy, cfg.rollout, greedy=True)
    try:
        for update in (1, 2):
            if update == 2:
                _randomise_lora(policy, seed=1)
            m = service.sync(update - 1)
            info = service.client.info()
            assert info.served_checkpoints == [service.checkpoint_id]
            assert info.last_merge.stats.sync == "lora+dense"  # vision LoRA: the dense fallback
            assert info.last_merge.stats.dense_modules > 0 and info.last_merge.stats.lora_modules > 0
            local = collect(policy, pool, cfg, update, sampler=LocalSampler(policy, greedy=True))
            remote = collect(policy, pool, cfg, update, sampler=service)
            assert any(s.image is not None for s in remote.flat())
            assert _tokens(remote) == _tokens(local), f"update {update}: the service's greedy tokens differ"
            assert {s.sampler_version for s in remote.flat()} == {m["rollout/policy_version"]}
        assert m["rollout/policy_version"] == 2
        assert _tokens(remote) != [[[]]]
    finally:
        service.close()
        pool.close()


def test_sampled_logprobs_agree_with_the_trainers_fp32_rescore(vl_dir, env_url, policy_url, tmp_path):
    cfg = _cfg(tmp_path, vl_dir, env_url, policy_url, "generation.temperature=0.7", "generation.max_new_tokens=24")
    policy = Policy(vl_dir, cfg.model, seed=0)
    _randomise_lora(policy, seed=2)
    pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options)
    service = ServiceSampler(policy, cfg.rollout)
    try:
        service.sync(0)
        rollout = collect(policy, pool, cfg, 1, sampler=service)
    finally:
        service.close()
        pool.close()
    gap = logprob_gap(rollout.flat())
    assert gap["rollout/sampler_tokens"] > 50
    assert any(s.image is not None for s in rollout.flat())
    assert gap["rollout/sampler_logprob_gap_max"] < ATOL, gap
    for s in rollout.flat():  # the sequence log-prob the TIS weight uses agrees too
        assert abs(s.sampler_logprob - s.logprob) < ATOL * len(s.tokens)


def test_a_stale_version_is_refused_and_a_rollout_never_mixes_versions(vl_dir, env_url, policy_url, tmp_path):
    cfg = _cfg(tmp_path, vl_dir, env_url, policy_url)
    policy = Policy(vl_dir, cfg.model, seed=0)
    pool = EnvPool(cfg.env.url, cfg.env.env_id, cfg.env.num_envs, cfg.env.options)
    service = ServiceSampler(policy, cfg.rollout)
    try:
        service.sync(0)
        rollout = collect(policy, pool, cfg, 1, sampler=service)
        assert {s.sampler_version for s in rollout.flat()} == {service.version}
        # Another client swaps the adapter under the trainer's feet.
        other = Policy(vl_dir, cfg.model, seed=5)
        _randomise_lora(other, seed=5)
        adapter = other.save_adapter(tmp_path / "other")
        with PolicyClient(policy_url) as c:
            c.upload_adapter(adapter, step=99)
            for _ in range(600):
                if c.info().version > service.version:
                    break
                import time

                time.sleep(0.05)
        with pytest.raises(StalePolicyError, match="sampled with adapter version"):
            collect(policy, pool, cfg, 2, sampler=service)
    finally:
        service.close()
        pool.close()


def test_two_updates_of_gtr_train_with_the_service_engine_and_kl_guidance(vl_dir, env_url, policy_url, tmp_path):
    """End to end: real env, hf teacher and vLLM policy services; `rollout.engine: service`."""
    with running_services(vl_dir, tmp_path / "teacher-store", teacher=True, env=False) as (_, teacher_url):
        cfg = _cfg(tmp_path, vl_dir, env_url, policy_url, f"teacher.url={teacher_url}", "guidance.mode=kl",
                   "updates=2", "rollout.tis_cap=2.0", "teacher.wait_for_merge_s=30", "ppo.minibatch_size=9",
                   "ppo.micro_batch_size=9")
        summary = train(cfg)
    assert summary["updates"] == 2
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/engine"] == "service"
        assert r["rollout/sampler_logprob_gap_max"] < ATOL, r
        assert r["teacher/kl_mean"] is not None and r["teacher/version"] is not None
        assert 0 < r["ppo/tis_weight_mean"] <= 2.0
    # Each update synced the adapter after the previous one: versions 1 (initial) and 2.
    assert [r["rollout/policy_version"] for r in rows] == [1, 2]
