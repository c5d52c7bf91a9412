"""Data parallelism on real torchrun processes (gloo, CPU, 2 ranks): the same recorded rollout
batch updated by one process and split over two gives the same weights.

The batch is built so that every piece of the global update matters: advantages whose moments
differ between the two ranks' halves (normalisation), minibatches of 5 out of 12 samples whose
shares differ between ranks (minibatching and accumulation), and a grad-norm clip that bites.
Normalising, minibatching, accumulating or clipping per rank each breaks the equality.
"""

from __future__ import annotations

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


def _update_split(tiny_model_dir, rollout: Path, out: Path, nproc: int, *sets: str) -> tuple[dict, dict, dict]:
    import json

    args = ["--model", str(tiny_model_dir), "--rollout", str(rollout), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    r = torchrun(nproc, "tests.dist_worker", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    return (load_file(str(out / "adapter.safetensors")), load_file(str(out / "value_head.safetensors")),
            json.loads((out / "metrics.json").read_text()))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_one_process_and_two_ranks_give_the_same_update(tiny_model_dir, recorded_rollout, tmp_path):
    from tests.dist_worker import run_update

    torch.set_num_threads(1)
    adapter1, head1, m1 = run_update(str(tiny_model_dir), torch.load(recorded_rollout, weights_only=False), Dist())
    assert m1["ppo/grad_norm"] > 0.05 * 2, "the clip must bite, or a per-rank clip would go unnoticed"
    assert m1["ppo/optimizer_steps"] == 2 * 3  # epochs x ceil(12 / 5): the global minibatches
    initial = {k: torch.zeros_like(v) for k, v in adapter1.items() if "lora_B" in k}
    assert _max_diff({k: adapter1[k] for k in initial}, initial) > 1e-4  # the update moved the adapter

    adapter2, head2, m2 = _update_split(tiny_model_dir, recorded_rollout, tmp_path / "two", 2)
    assert m2["ppo/optimizer_steps"] == m1["ppo/optimizer_steps"]
    assert _max_diff(adapter1, adapter2) <= 1e-6
    assert _max_diff(head1, head2) <= 1e-6
    assert m2["ppo/grad_norm"] == pytest.approx(m1["ppo/grad_norm"], rel=1e-5)  # the global norm


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
