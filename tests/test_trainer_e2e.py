"""End to end on CPU: the real env and teacher services (uvicorn threads), the tiny model
SFT-initialised by `gtr sft`, then `gtr train` with KL and SFT guidance, resume, eval."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from services.trainer.config import load_train_config
from services.trainer.evaluate import evaluate
from services.trainer.sft_init import SFTConfig, run_sft
from services.trainer.status import StatusBoard
from services.trainer.train import train
from tests.trainer_services import free_port, running_services

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ("update", "env_steps", "success_rate", "mean_return", "format_ok_rate", "kl_mean", "teacher_version",
            "seconds_rollout", "seconds_teacher", "seconds_ppo")


@pytest.fixture(scope="module")
def env_url(tmp_path_factory):
    with running_services(None, None, teacher=False) as (url, _):
        yield url


@pytest.fixture(scope="module")
def sft_model(env_url, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "model"
    cfg = SFTConfig(model={"path": str(tiny_model_dir), "device": "cpu", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
                    env={"url": env_url, "env_id": "numberline"}, lr=1e-2, out=str(out), episodes=30, epochs=8, progress=False)
    return run_sft(cfg)


@pytest.fixture(scope="module")
def teacher_url(sft_model, tmp_path_factory):
    with running_services(sft_model["out"], tmp_path_factory.mktemp("store"), teacher=True, env=False) as (_, url):
        yield url


def _cfg(tmp_path, model, env_url, teacher_url, mode, *extra):
    return load_train_config(str(ROOT / "configs/tiny-cpu.yaml"), [
        f"model.path={model}", f"env.url={env_url}", f"teacher.url={teacher_url}", f"guidance.mode={mode}",
        "updates=2", f"run_dir={tmp_path / mode}", "trainer.port=0", "logging.progress=false",
        "teacher.wait_for_merge_s=30", "generation.max_new_tokens=48", "env.num_steps=4", *extra])


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sft_init_gives_a_format_valid_base(sft_model, env_url):
    assert sft_model["demonstrations"] > 30 and sft_model["expert_success_rate"] == 1.0
    assert sft_model["losses"][-1] < 0.5 * sft_model["losses"][0]
    out = Path(sft_model["out"])
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "preprocessor_config.json").exists()
    report = evaluate(str(out), env_url, "numberline", episodes=6, max_new_tokens=48, num_envs=6)
    assert report["episodes"] == 6 and report["format_ok_rate"] > 0.5
    assert {"success_rate", "mean_return", "per_task_type", "per_episode"} <= set(report)


def test_train_kl_two_updates(tmp_path, sft_model, env_url, teacher_url):
    cfg = _cfg(tmp_path, sft_model["out"], env_url, teacher_url, "kl")
    summary = train(cfg)
    rows = _metrics(cfg.run_dir)
    assert [r["update"] for r in rows] == [1, 2] and summary["env_steps"] == 64
    for r in rows:
        assert set(CONTRACT) <= set(r)
        assert r["teacher/unavailable"] == 0 and r["teacher/guided_frac"] > 0
        assert r["kl_mean"] is not None and math.isfinite(r["kl_mean"]) and r["kl_mean"] >= 0
    # Teacher version 0 is the base, i.e. the student before its first update (LoRA B = 0): the
    # two sides see the same tokens, image and positions, so the KL is zero up to float noise.
    assert rows[0]["teacher_version"] == 0 and rows[0]["kl_mean"] < 1e-4
    assert rows[1]["teacher_version"] > rows[0]["teacher_version"]  # each update's push was merged
    assert rows[1]["kl_mean"] > 0  # the merged teacher differs from the updated student
    samples = [json.loads(line) for line in (Path(cfg.run_dir) / "samples/update_00002.jsonl").read_text().splitlines()]
    assert samples and all("kl_per_token" in s and "output" in s and "reward" in s for s in samples)
    assert all(s["kl_per_token"] for s in samples if s["thought_ok"])
    assert any(Path(cfg.run_dir, "samples", s["image"]).exists() for s in samples if s["image"])
    assert list((Path(cfg.run_dir) / "tensorboard").iterdir())
    # eval with the trained adapter (the checkpoint dir holds peft's files)
    rep = evaluate(sft_model["out"], env_url, "numberline", episodes=2, adapter=str(Path(cfg.run_dir) / "checkpoint"),
                   greedy=False, temperature=1.0, max_new_tokens=48)
    assert rep["adapter"] and rep["episodes"] == 2


def test_train_sft_two_updates(tmp_path, sft_model, env_url, teacher_url):
    cfg = _cfg(tmp_path, sft_model["out"], env_url, teacher_url, "sft")
    train(cfg)
    rows = _metrics(cfg.run_dir)
    assert [r["update"] for r in rows] == [1, 2]
    for r in rows:
        assert set(CONTRACT) <= set(r) and r["teacher/unavailable"] == 0
        assert r["sft/teacher_parse_rate"] > 0 and r["sft/ce"] > 0
    assert rows[1]["teacher_version"] > rows[0]["teacher_version"]
    assert rows[1]["sft/buffer_size"] >= rows[0]["sft/buffer_size"]


def test_resume_gives_the_same_weights(tmp_path, sft_model, env_url):
    def cfg(name, *extra):
        return _cfg(tmp_path, sft_model["out"], env_url, "http://127.0.0.1:9", "none", f"run_dir={tmp_path / name}",
                    "ppo.epochs=1", *extra)

    train(cfg("straight"))
    board = StatusBoard(2, str(tmp_path / "resumed"), "none")
    board.stop_requested.set()  # what POST /v1/stop does: finish the update, save, stop
    first = train(cfg("resumed"), board=board)
    assert first["stopped"] and first["updates"] == 1
    second = train(cfg("resumed", "resume=true"))
    assert second["updates"] == 2
    for f in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = (load_file(str(tmp_path / d / "checkpoint" / f)) for d in ("straight", "resumed"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f
    assert [r["update"] for r in _metrics(tmp_path / "resumed")] == [1, 2]
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert straight[1]["ppo/pg_loss"] == resumed[1]["ppo/pg_loss"]


@pytest.mark.timeout(1200)  # two runs and two teachers; the SFT fixture may be built here first
def test_one_seed_gives_identical_guided_runs_despite_a_slow_background_merge(tmp_path, sft_model, env_url,
                                                                              monkeypatch):
    """Two short KL runs with one seed give identical metrics, wall-clock and memory aside (each
    against a fresh teacher).
    The teacher merges in the background; slowed to 5 s here, each update must still be guided
    by the merge of the previous update's checkpoint (teacher.await_merge_s), not by whichever
    version the teacher happens to serve when asked."""
    import time

    from services.teacher.service import TeacherService

    merge_now = TeacherService.merge_now

    def slow_merge(self):
        time.sleep(5)
        return merge_now(self)

    monkeypatch.setattr(TeacherService, "merge_now", slow_merge)
    runs = []
    for name in ("a", "b"):
        with running_services(sft_model["out"], tmp_path / f"store-{name}", teacher=True, env=False) as (_, url):
            cfg = _cfg(tmp_path, sft_model["out"], env_url, url, "kl", f"run_dir={tmp_path / name}", "updates=3",
                       "env.num_envs=4", "env.num_steps=2", "teacher.wait_for_merge_s=0", "logging.tensorboard=false",
                       "ppo.minibatch_size=8", "ppo.micro_batch_size=8")
            train(cfg)
        runs.append([{k: v for k, v in r.items() if not k.startswith(("time/", "seconds_", "memory/"))}
                     for r in _metrics(cfg.run_dir)])
    a, b = runs
    assert [r["teacher/version"] for r in a] == [0, 1, 2]
    assert any(r["teacher/guided_frac"] > 0 for r in a)
    diff = [{k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
            for x, y in zip(a, b, strict=True)]
    assert diff == [{}, {}, {}]


def test_teacher_unreachable_runs_unguided_and_says_so(tmp_path, sft_model, env_url, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(tmp_path, sft_model["out"], env_url, dead, "kl", "updates=1", "teacher.retries=1")
    with caplog.at_level(logging.WARNING):
        train(cfg)
    row = _metrics(cfg.run_dir)[0]
    assert row["teacher/unavailable"] == 1 and row["kl_mean"] is None and row["teacher/push_failed"] == 1
    assert "TEACHER UNAVAILABLE" in caplog.text


def test_gtr_train_and_eval_cli(tmp_path, sft_model, env_url):
    import threading

    import httpx

    from shared.cli import main

    port = free_port()
    seen: list[dict] = []
    done = threading.Event()

    saved: list[httpx.Response] = []

    def poll():  # the trainer's status service answers while it trains
        while not done.is_set():
            try:
                seen.append(httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=1).json())
                if seen[-1]["phase"] == "rollout" and seen[-1]["update"] == 0 and not saved:
                    # save-now during update 1's rollout: written at the next phase boundary
                    saved.append(httpx.post(f"http://127.0.0.1:{port}/v1/checkpoint", timeout=60))
            except httpx.HTTPError:
                pass
            done.wait(0.05)

    t = threading.Thread(target=poll)
    t.start()
    try:
        rc = main(["train", "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--set", f"model.path={sft_model['out']}",
                   "--set", f"env.url={env_url}", "--set", "guidance.mode=none", "--set", "updates=2", "env.num_steps=3",
                   "--set", f"run_dir={tmp_path / 'cli'}", "--set", "logging.progress=false", "--port", str(port)])
    finally:
        done.set()
        t.join()
    assert rc == 0
    rows = _metrics(tmp_path / "cli")
    assert set(CONTRACT) <= set(rows[0]) and rows[0]["kl_mean"] is None and rows[0]["teacher_version"] is None
    assert (tmp_path / "cli" / "config.yaml").exists()
    assert seen and {s["phase"] for s in seen} & {"starting", "rollout", "teacher", "ppo", "checkpoint"}
    assert all(s["updates_total"] == 2 for s in seen)
    assert saved and saved[0].status_code == 200 and saved[0].json()["ok"]
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", sft_model["out"], "--adapter", str(tmp_path / "cli" / "checkpoint"), "--env-url",
               env_url, "--env-id", "numberline", "--episodes", "3", "--max-new-tokens", "48", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["episodes"] == 3 and 0 <= report["success_rate"] <= 1
    assert [e["seed"] for e in report["per_episode"]] == [10_000, 10_001, 10_002]
