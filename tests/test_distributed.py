"""Data parallelism on real torchrun processes (gloo, CPU, 2 ranks): the same recorded rollout
batch updated by one process and split over two gives the same weights.

The batch is built so that every piece of the global update matters: advantages whose moments
differ between the two ranks' halves (normalisation), minibatches of 5 out of 12 samples whose
shares differ between ranks (minibatching and accumulation), and a grad-norm clip that bites.
Normalising, minibatching, accumulating or clipping per rank each breaks the equality.
"""

from __future__ import annotations

import contextlib

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.trainer.distributed import Dist, DistributedError, global_moments, reduce_metrics
from services.trainer.losses import normalize

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, module: str, *args: str, timeout: float = 300, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded_rollout(tiny_model_dir, tmp_path_factory) -> Path:
    from tests.dist_worker import record_rollout

    return record_rollout(tiny_model_dir, tmp_path_factory.mktemp("rollout") / "rollout.pt")


def _update_split(tiny_model_dir, rollout: Path, out: Path, nproc: int, *sets: str, sft_ranks: str = ""
                  ) -> tuple[dict, dict, dict]:
    import json

    args = ["--model", str(tiny_model_dir), "--rollout", str(rollout), "--out", str(out), "--sft-ranks", sft_ranks]
    for s in sets:
        args += ["--set", s]
    r = torchrun(nproc, "tests.dist_worker", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    return (load_file(str(out / "adapter.safetensors")), load_file(str(out / "value_head.safetensors")),
            json.loads((out / "metrics.json").read_text()))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process_update(tiny_model_dir, recorded_rollout) -> tuple[dict, dict, dict]:
    from tests.dist_worker import run_update

    torch.set_num_threads(1)
    return run_update(str(tiny_model_dir), torch.load(recorded_rollout, weights_only=False), Dist())


@pytest.mark.slow
def test_one_process_and_two_ranks_give_the_same_update(tiny_model_dir, recorded_rollout, one_process_update, tmp_path):
    adapter1, head1, m1 = one_process_update
    assert m1["ppo/grad_norm"] > 0.05 * 2, "the clip must bite, or a per-rank clip would go unnoticed"
    assert m1["ppo/optimizer_steps"] == 2 * 3  # epochs x ceil(12 / 5): the global minibatches
    initial = {k: torch.zeros_like(v) for k, v in adapter1.items() if "lora_B" in k}
    assert _max_diff({k: adapter1[k] for k in initial}, initial) > 1e-4  # the update moved the adapter

    adapter2, head2, m2 = _update_split(tiny_model_dir, recorded_rollout, tmp_path / "two", 2)
    # PyTorch's DDP reduced the gradients, with zero-weight micro-batches where a rank's share was smaller.
    assert m1["wrapper"] == "TrainableForward" and m2["wrapper"] == "DistributedDataParallel"
    assert m1["ppo/padded_backwards"] == 0 and m2["ppo/padded_backwards"] > 0
    assert m2["ppo/optimizer_steps"] == m1["ppo/optimizer_steps"]
    assert _max_diff(adapter1, adapter2) <= 1e-6
    assert _max_diff(head1, head2) <= 1e-6
    assert m2["ppo/grad_norm"] == pytest.approx(m1["ppo/grad_norm"], rel=1e-5)  # the global norm


@pytest.mark.slow
def test_a_sharded_base_gives_the_same_update(tiny_model_dir, recorded_rollout, one_process_update, tmp_path):
    """model.fsdp on 2 ranks: the frozen decoder layers sharded with FSDP2's fully_shard (each rank
    holds half of each), LoRA and value head replicated and reduced by DDP; the padded micro-batches
    make every rank run the same forwards, which FSDP's all-gathers need. The same update."""
    adapter1, head1, m1 = one_process_update
    adapter2, head2, m2 = _update_split(tiny_model_dir, recorded_rollout, tmp_path / "fsdp", 2, "model.fsdp=true")
    assert m2["sharded_layers"] == 2 and m2["sharded_params"] > 0 and m2["wrapper"] == "DistributedDataParallel"
    assert m2["ppo/padded_backwards"] > 0
    assert _max_diff(adapter1, adapter2) <= 1e-6
    assert _max_diff(head1, head2) <= 1e-6
    assert m2["ppo/grad_norm"] == pytest.approx(m1["ppo/grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_a_sharded_base_runs_generation_and_values_in_lock_step(tiny_model_dir, recorded_rollout, tmp_path):
    """Rank 0's outputs end early and rank 1 has no bootstrap value to compute: with model.fsdp
    every rank still runs every forward (synced generation, a stand-in value forward), and each
    rank's results equal an unsharded copy's in the same process."""
    import json

    out = tmp_path / "lockstep"
    r = torchrun(2, "tests.dist_worker", "--model", str(tiny_model_dir), "--rollout", str(recorded_rollout),
                 "--out", str(out), "--lockstep", timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    for res in ranks:
        assert res["resharded"] and res["adapter_loads"]
        assert res["sharded_tokens"] == res["plain_tokens"]
        assert res["sharded_values"] == pytest.approx(res["plain_values"], abs=1e-6)
    assert max(map(len, ranks[0]["sharded_tokens"])) < min(map(len, ranks[1]["sharded_tokens"]))
    assert len(ranks[0]["sharded_values"]) == 2 and ranks[1]["sharded_values"] == []


@pytest.mark.slow
def test_sft_replay_joins_the_ddp_accumulation_with_gradient_checkpointing(tiny_model_dir, recorded_rollout, tmp_path):
    """The SFT replay CE (guidance sft) is one more backward inside DDP's accumulation; a rank
    with an empty replay buffer runs a zero-weight one instead. Rank 0 alone holds one example, so
    DDP's mean over 2 ranks is alpha / 2 x its CE: one process with alpha / 2 takes the same step
    (a small alpha: with alpha 1 this tiny random model amplifies float rounding to ~5e-7).
    With gradient checkpointing (non-reentrant) under DDP."""
    from tests.dist_worker import run_update

    torch.set_num_threads(1)
    sets = ["model.gradient_checkpointing=true"]
    adapter1, head1, m1 = run_update(str(tiny_model_dir), torch.load(recorded_rollout, weights_only=False), Dist(),
                                     [*sets, "guidance.sft_alpha=0.1"], sft_ranks=(0,))
    assert m1["sft/ce"] > 0
    adapter2, head2, m2 = _update_split(tiny_model_dir, recorded_rollout, tmp_path / "two", 2, *sets,
                                        "guidance.sft_alpha=0.2", sft_ranks="0")
    assert m2["sft/ce"] == pytest.approx(m1["sft/ce"], rel=1e-6)  # rank 0's own CE, the same example
    assert _max_diff(adapter1, adapter2) <= 1e-6
    assert _max_diff(head1, head2) <= 1e-6
    assert m2["ppo/grad_norm"] == pytest.approx(m1["ppo/grad_norm"], rel=1e-5)


# ------------------------------------------------------------------ pure helpers (no processes)


def test_global_moments_at_world_size_one_are_the_batch_moments():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0])
    mean, std = global_moments(x, Dist())
    assert float(mean) == pytest.approx(3.75) and float(std) == pytest.approx(float(x.std()))
    assert torch.allclose(normalize(x, 1e-8, mean, std), normalize(x))
    m1, s1 = global_moments(torch.tensor([5.0]), Dist())
    assert float(m1) == 5.0 and float(s1) == 0.0


def test_shard_must_divide():
    assert Dist(rank=1, world_size=2).shard(8, "env.num_envs") == (4, 4)
    with pytest.raises(ValueError, match="env.num_envs=6 does not divide over 4 ranks"):
        Dist(rank=0, world_size=4).shard(6, "env.num_envs")


def test_reduce_metrics_sums_counts_and_averages_the_rest():
    out = reduce_metrics([{"a": 1.0, "n": 2, "v": 3, "s": "kl", "x": None}, {"a": 3.0, "n": 5, "v": 4, "s": "kl"}],
                         sums=("n",), maxes=("v",))
    assert out == {"a": 2.0, "n": 7, "v": 4, "s": "kl", "x": None}


def test_a_failed_collective_names_itself_and_the_rank():
    d = Dist(rank=1, world_size=2, backend="gloo", timeout_s=30)
    err = d._fail("advantage moments", RuntimeError("Connection closed by peer"))
    assert isinstance(err, DistributedError)
    assert "rank 1/2" in str(err) and "'advantage moments'" in str(err) and "Another rank died" in str(err)


# ------------------------------------------------------------------ gtr train --nproc 2 (real services)


def _train_argv(tiny_model_dir, run_dir: Path, env_url: str, teacher_url: str, mode: str, *extra: str) -> list[str]:
    sets = [f"model.path={tiny_model_dir}", f"env.url={env_url}", f"teacher.url={teacher_url}",
            f"guidance.mode={mode}", "updates=2", f"run_dir={run_dir}", "logging.progress=false",
            "env.num_envs=4", "env.num_steps=4", "env.options={max_position: 1}", "generation.max_new_tokens=12",
            "ppo.epochs=1", "ppo.minibatch_size=8", "ppo.micro_batch_size=4", "logging.samples_per_update=1",
            "distributed.timeout_s=60", *extra]
    argv = [sys.executable, "-m", "shared.cli", "train", "--nproc", "2", "--config",
            str(ROOT / "configs/tiny-cpu.yaml"), "--port", "0"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _run(argv: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def env_url():
    from tests.trainer_services import running_services

    with running_services(None, None, teacher=False) as (url, _):
        yield url


@pytest.mark.slow
def test_gtr_train_on_two_ranks(tiny_model_dir, env_url, tmp_path):
    from shared.teacher_client import TeacherClient
    from tests.trainer_services import running_services

    run_dir = tmp_path / "run"
    with running_services(tiny_model_dir, tmp_path / "store", env=False) as (_, teacher_url):
        r = _run(_train_argv(tiny_model_dir, run_dir, env_url, teacher_url, "kl", "teacher.wait_for_merge_s=30"))
        assert r.returncode == 0, r.stderr[-5000:]
        with TeacherClient(teacher_url) as teacher:
            steps = sorted(c.step for c in teacher.checkpoints().checkpoints)
            version = teacher.info().version
    assert steps == [1, 2]  # one push per update (rank 0 alone), not one per rank
    rows = _rows(run_dir)
    assert [row["update"] for row in rows] == [1, 2]
    for row in rows:
        assert row["dist/world_size"] == 2 and row["env_steps"] == row["update"] * 4 * 4
        # NumberLine with max_position 1 ends an episode every 2 steps at most: each rank's 2 envs
        # end at least 4 episodes per update, and the logged count is both ranks' together.
        per_rank = [row["dist/rank0/episodes"], row["dist/rank1/episodes"]]
        assert min(per_rank) >= 4 and row["rollout/episodes"] == sum(per_rank)
        assert row["teacher/unavailable"] == 0 and row["teacher/version_skew"] == 0
    assert rows[1]["teacher/version"] > rows[0]["teacher/version"] and version >= rows[1]["teacher/version"]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.jsonl")) == ["update_00001.jsonl", "update_00002.jsonl"]
    assert "[rank 1]" in r.stderr and "[rank 0]" in r.stderr


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, env_url, tmp_path_factory) -> Path:
    """A 2-rank run of 2 updates, guidance none (no pushes: the teacher address is never used)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    r = _run(_train_argv(tiny_model_dir, run_dir, env_url, "http://127.0.0.1:9", "none"))
    assert r.returncode == 0, r.stderr[-5000:]
    return run_dir


@pytest.mark.slow
def test_gtr_train_with_a_sharded_base_matches_the_replicated_run(tiny_model_dir, env_url, straight_run, tmp_path):
    """model.fsdp on 2 ranks: the decoder layers sharded with FSDP2, generation in lock-step
    (synced_gpus), bootstrap values and padded PPO micro-batches on every rank together. The same
    run as the replicated one (all-gathered weights are the same weights): rollouts and the trained
    adapter equal."""
    run_dir = tmp_path / "fsdp"
    r = _run(_train_argv(tiny_model_dir, run_dir, env_url, "http://127.0.0.1:9", "none", "model.fsdp=true"))
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stderr.count("model.fsdp: 2 decoder layers sharded over 2 ranks (FSDP2)") == 2
    rows, base = _rows(run_dir), _rows(straight_run)
    assert [row["update"] for row in rows] == [1, 2]
    for row, ref in zip(rows, base, strict=True):
        for k in ("env_steps", "rollout/episodes", "rollout/mean_return", "rollout/tokens_mean", "ppo/pg_loss"):
            assert row[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    for f in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = (load_file(str(d / "checkpoint" / f)) for d in (straight_run, run_dir))
        assert _max_diff(a, b) <= 1e-6, f


@pytest.mark.slow
def test_killed_two_rank_run_resumes_bit_identical(tiny_model_dir, env_url, straight_run, tmp_path):
    import time

    import psutil

    from services.trainer.checkpoint import ResumeError, load_checkpoint
    from services.trainer.config import load_train_config
    from services.trainer.policy import Policy
    from services.trainer.ppo import make_optimizer

    dead = "http://127.0.0.1:9"  # guidance none, no pushes: the teacher never answers
    straight, resumed = straight_run, tmp_path / "resumed"

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(_train_argv(tiny_model_dir, resumed, env_url, dead, "none"), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (resumed / "checkpoint" / "trainer_state.pt").exists():
            assert p.poll() is None and time.monotonic() < deadline, "no checkpoint after update 1"
            time.sleep(0.05)
    finally:
        # torchrun and both ranks, mid update 2. The ranks run in their own sessions: killing
        # torchrun's process group alone would leave them training to the end.
        procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
        for proc in procs:
            proc.kill()
        psutil.wait_procs(procs, timeout=30)
        p.wait()
    assert len(_rows(resumed)) == 1
    r = _run(_train_argv(tiny_model_dir, resumed, env_url, dead, "none") + ["--resume"])
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stderr.count("after update 1 (16 env steps)") == 2  # both ranks resumed from update 1
    for f in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = (load_file(str(d / "checkpoint" / f)) for d in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    s_rows, r_rows = _rows(straight), _rows(resumed)
    assert [row["update"] for row in r_rows] == [1, 2]
    assert s_rows[1]["ppo/pg_loss"] == r_rows[1]["ppo/pg_loss"]
    assert s_rows[1]["rollout/mean_return"] == r_rows[1]["rollout/mean_return"]

    # The same checkpoint in one process: refused, saying how many ranks wrote it.
    cfg = load_train_config(str(ROOT / "configs/tiny-cpu.yaml"), [f"model.path={tiny_model_dir}", "model.device=cpu"])
    policy = Policy(tiny_model_dir, cfg.model)
    optimizer, scheduler = make_optimizer(policy, cfg)
    with pytest.raises(ResumeError, match=r"written by 2 rank\(s\) but this run has 1.*--nproc 2"):
        load_checkpoint(resumed, policy, optimizer, scheduler, None, Dist())


def test_multi_gpu_compose_override():
    """docker-compose.multi-gpu.yml parsed by the real compose over docker-compose.yml: the trainer
    on TRAINER_GPUS via torchrun (one rank per GPU), two teacher replicas on other GPUs, each with
    its own store, both in teacher.url."""
    import json

    from tests.test_deploy import _compose_bin

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEACHER", "TRAINER_", "TRAIN_"))}
    out = subprocess.run([_compose_bin(), "-f", "docker-compose.yml", "-f", "docker-compose.multi-gpu.yml", "config",
                          "--format", "json"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**env, "MODEL_DIR": "/tmp/model", "TRAINER_GPUS": "0,1,2,3,4,5", "TEACHER_GPU": "6",
                              "TEACHER2_GPU": "7"})
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)["services"]

    def gpus(name):
        return [i for d in s[name]["deploy"]["resources"]["reservations"]["devices"] for i in d["device_ids"]]

    assert gpus("trainer") == ["0,1,2,3,4,5"] and gpus("teacher") == ["6"] and gpus("teacher-2") == ["7"]
    cmd = s["trainer"]["command"]
    assert cmd[:4] == ["gtr", "train", "--nproc", "gpu"]
    assert "teacher.url=http://teacher:8200,http://teacher-2:8200" in cmd
    assert s["trainer"]["depends_on"]["teacher-2"]["condition"] == "service_healthy"
    stores = {n: [v["source"] for v in s[n]["volumes"] if v["target"] == "/checkpoints"] for n in ("teacher", "teacher-2")}
    assert stores == {"teacher": ["checkpoints"], "teacher-2": ["checkpoints-2"]}
    assert "ports" not in s["teacher-2"] and s["teacher-2"]["command"] == s["teacher"]["command"]
    # The command gtr train --nproc gpu stands for.
    from shared.cli import build_parser
    from services.trainer.cli import torchrun_argv

    args = build_parser().parse_args(["train", "--nproc", "gpu", "--config", "c.yaml", "--set", "a=1", "--resume"])
    assert torchrun_argv(args)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=gpu", "-m",
                                       "services.trainer", "--log-level", "INFO", "train", "--config", "c.yaml",
                                       "--set", "a=1", "--resume"]


def test_a_failed_collective_is_reported_while_the_rank_still_handles_sigterm(monkeypatch, tmp_path):
    """When a rank dies, torchrun SIGTERMs the survivors within its 0.1 s monitor interval. Once
    `gtr train` restores the default SIGTERM action, a survivor still printing its traceback dies
    silently (seen once in CI): the error must be said before that."""
    import logging
    import signal

    import services.trainer.train as train_module
    from shared.cli import main

    def collective_fails(cfg, board):
        raise DistributedError("rank 0/2: the collective 'stop and checkpoint requests' failed (RuntimeError: reset)")

    said: list[tuple[str, object]] = []

    class Spy(logging.Handler):
        def emit(self, record):
            said.append((record.getMessage(), signal.getsignal(signal.SIGTERM)))

    monkeypatch.setattr(train_module, "train", collective_fails)
    spy = Spy(level=logging.ERROR)
    before = signal.getsignal(signal.SIGTERM)
    logging.getLogger().addHandler(spy)
    try:
        rc = main(["train", "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--set", f"run_dir={tmp_path / 'run'}"])
    finally:
        logging.getLogger().removeHandler(spy)
    assert rc == 1
    errors = [(msg, handler) for msg, handler in said if "the collective 'stop and checkpoint requests'" in msg]
    assert errors, said
    msg, handler = errors[0]
    assert msg.startswith("DistributedError: rank 0/2")
    assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), "logged after the SIGTERM handler was given back"
    assert signal.getsignal(signal.SIGTERM) == before  # and given back afterwards


@pytest.mark.slow
def test_a_dead_rank_stops_the_survivor_with_a_clear_message(tiny_model_dir, env_url, tmp_path):
    import time

    import psutil

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(_train_argv(tiny_model_dir, run_dir, env_url, "http://127.0.0.1:9", "none", "updates=20"),
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists():
            assert p.poll() is None and time.monotonic() < deadline, "no update finished"
            time.sleep(0.05)
        rank1 = [c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].kill()  # SIGKILL: no goodbye to the process group
        _, stderr = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    assert p.returncode != 0
    assert "[rank 0]" in stderr and "DistributedError: rank 0/2: the collective" in stderr, stderr[-4000:]
    assert "Another rank died or hung longer than distributed.timeout_s=60s" in stderr


def _counter(url: str, pattern: str) -> float:
    """The sum of a service's Prometheus samples whose name and labels match `pattern`."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf'^{pattern} (\S+)$', text, re.M))


def _generate_requests(url: str) -> float:
    return _counter(url, r'teacher_requests_total\{[^}]*generate[^}]*\}')


@contextlib.contextmanager
def _policy_service(model_dir, store):
    """The policy service (the teacher's app in its `latest` role) on a free port."""
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings
    from services.trainer.app import ServerThread
    from shared.client import ServiceClient
    from tests.trainer_services import free_port

    port = free_port()
    server = ServerThread(create_app(TeacherSettings(model=str(model_dir), store=str(store), device="cpu",
                                                     merge={"method": "latest"})), "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}"
        ServiceClient(url, service="policy").wait_ready(timeout=120)
        yield url
    finally:
        server.stop()


@pytest.mark.slow
def test_two_env_and_two_teacher_replicas_serve_one_two_rank_run(tiny_model_dir, tmp_path):
    from contextlib import ExitStack

    from shared.teacher_client import TeacherClient
    from tests.trainer_services import running_services

    run_dir = tmp_path / "run"
    with ExitStack() as stack:
        envs = [stack.enter_context(running_services(None, None, teacher=False))[0] for _ in range(2)]
        teachers = [stack.enter_context(running_services(tiny_model_dir, tmp_path / f"store{i}", env=False))[1]
                    for i in range(2)]
        policies = [stack.enter_context(_policy_service(tiny_model_dir, tmp_path / f"policy{i}")) for i in range(2)]
        # SFT guidance asks /v1/generate about every step (the tiny model's outputs need not parse),
        # two items per request: 4 requests per rank per update to spread. Rollouts are sampled by
        # two policy-service replicas, one item per request: 8 per rank per update.
        r = _run(_train_argv(tiny_model_dir, run_dir, ",".join(envs), ",".join(teachers), "sft", "teacher.batch_size=2",
                             "teacher.wait_for_merge_s=30", "guidance.teacher_max_new_tokens=8",
                             "rollout.engine=service", f"rollout.url={','.join(policies)}", "rollout.batch_size=1"))
        assert r.returncode == 0, r.stderr[-5000:]
        sampled = [_generate_requests(url) for url in policies]
        synced = []
        for url in policies:
            with TeacherClient(url) as p:
                synced.append(sorted(c.step for c in p.checkpoints().checkpoints))
        infos, steps, served = [], [], []
        for url in teachers:
            with TeacherClient(url) as t:
                infos.append(t.info())
                steps.append(sorted(c.step for c in t.checkpoints().checkpoints))
            served.append(_generate_requests(url))
        env_steps = [_counter(url, r'env_steps_total\{[^}]*\}') for url in envs]
    # Each rank spreads its 2 sessions over the 2 env replicas: 2 updates x 4 envs x 4 steps in all.
    assert all(n > 0 for n in env_steps) and sum(env_steps) == 2 * 4 * 4, env_steps
    assert steps == [[1, 2], [1, 2]]  # every checkpoint pushed to every replica, once
    assert infos[0].version == infos[1].version > 0  # the same checkpoints merged: the same version
    assert all(n >= 4 for n in served) and sum(served) == 2 * 2 * 4, served  # spread over both replicas
    assert synced == [[0, 1], [0, 1]]  # rank 0 synced every replica before each update, once
    assert all(n > 0 for n in sampled) and sum(sampled) == 2 * 2 * 2 * 4, sampled  # both ranks, both replicas
    rows = _rows(run_dir)
    assert [row["rollout/policy_replicas_synced"] for row in rows] == [2, 2]
    assert [row["teacher/version_skew"] for row in rows] == [0, 0]
    assert all(row["teacher/unavailable"] == 0 for row in rows)


def test_teacher_replicas_spread_skip_a_dead_replica_and_push_to_each(tiny_model_dir, tmp_path):
    """TeacherReplicas against a real teacher and a dead address: requests start on alternate
    replicas and a dead one is skipped for the next; uploads reach every replica that answers,
    and the dead one's failure is reported, not raised."""
    from peft import get_peft_model

    from services.trainer.config import LoraSettings
    from services.trainer.policy import lora_config
    from shared.client import ServiceError
    from shared.models import load_model
    from shared.schemas import GenerateItem, GenerateRequest
    from shared.teacher_client import TeacherReplicas
    from tests.trainer_services import free_port, running_services

    dead = f"http://127.0.0.1:{free_port()}"
    with running_services(tiny_model_dir, tmp_path / "store", env=False) as (_, live):
        replicas = TeacherReplicas([dead, live], timeout=30, retries=0, start=1)
        try:
            item = GenerateItem(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                max_new_tokens=2, temperature=0)
            replies = replicas.generate([GenerateRequest(items=[item])] * 3)  # live, dead -> live, live
            assert [len(r.items) for r in replies] == [1, 1, 1]
            assert _generate_requests(live) == 3
            adapter = tmp_path / "adapter"
            get_peft_model(load_model(tiny_model_dir, "cpu"), lora_config(LoraSettings(r=2))).save_pretrained(adapter)
            out = replicas.each(lambda c: c.upload_adapter(adapter, step=1))
            assert isinstance(out[0], ServiceError) and out[0].status is None  # the dead one: unreachable
            assert not isinstance(out[1], ServiceError) and out[1].checkpoint_id
        finally:
            replicas.close()
    with pytest.raises(ServiceError):  # no replica left: the error, for the caller's unavailable policy
        TeacherReplicas([dead], retries=0).generate([GenerateRequest(items=[item])])
