"""Env steps per second of `gtr train --nproc 2` against `--nproc 1` at the same global batch
(env.num_envs x env.num_steps), tiny model, gloo on CPU, side by side in one run against the real
env service (uvicorn thread). Both go through torchrun; with one rank there is no process group.

Steps per second are the metrics' `time/sps`: the global batch over the update's rollout + PPO
seconds, averaged over the updates after the first (a warm-up). On a 2-core machine the two
ranks share the cores with the env service and each other, so this measures the overhead and
whatever parallelism is left, not multi-GPU scaling (no multi-GPU machine was available).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPDATES = 3
ROUNDS = 2
NUM_ENVS, NUM_STEPS = 4, 8


def _run(nproc: int, model: Path, env_url: str, run_dir: Path, threads: int) -> list[dict]:
    sets = [f"model.path={model}", f"env.url={env_url}", "guidance.mode=none", f"updates={UPDATES}",
            f"run_dir={run_dir}", "logging.progress=false", "logging.tensorboard=false", "logging.samples_per_update=0",
            f"env.num_envs={NUM_ENVS}", f"env.num_steps={NUM_STEPS}", "generation.max_new_tokens=32",
            "ppo.epochs=1", "ppo.minibatch_size=16", "ppo.micro_batch_size=8"]
    argv = [sys.executable, "-m", "shared.cli", "--log-level", "WARNING", "train", "--nproc", str(nproc),
            "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--port", "0"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"gtr train --nproc {nproc} failed:\n{r.stderr[-3000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(out_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from shared.tiny_model import build_tiny_model
    from tests.trainer_services import running_services

    cores = os.cpu_count() or 1
    sps: dict[int, list[float]] = {1: [], 2: []}
    seconds: dict[int, dict[str, list[float]]] = {n: {"rollout": [], "ppo": []} for n in (1, 2)}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "tiny", seed=0, size="tiny")
        with running_services(None, None, teacher=False) as (env_url, _):
            for r in range(ROUNDS):
                for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                    # One torch thread per rank: on a shared 2-core machine a single process with 2
                    # OpenMP threads under outside load ran ~15x slower than with 1 (spinning
                    # threads waiting for a busy core), which would flatter the 2-rank figure.
                    rows = _run(nproc, model, env_url, tmp / f"n{nproc}-{r}", threads=1)
                    for row in rows[1:]:
                        sps[nproc].append(row["time/sps"])
                        seconds[nproc]["rollout"].append(row["time/rollout_s"])
                        seconds[nproc]["ppo"].append(row["time/ppo_s"])
    med = {n: statistics.median(v) for n, v in sps.items()}
    return {
        "what": "env steps/s of gtr train, 2 gloo ranks vs 1, same global batch, tiny model, guidance none, "
                "1 torch thread per rank",
        "global_batch": NUM_ENVS * NUM_STEPS, "cpu_cores": cores, "updates_counted": len(sps[1]),
        "sps_1_rank": round(med[1], 2), "sps_2_ranks": round(med[2], 2),
        "ratio_2_over_1": round(med[2] / med[1], 3),
        "seconds_median": {f"{n}_rank{'s' if n > 1 else ''}": {k: round(statistics.median(v), 3) for k, v in d.items()}
                           for n, d in seconds.items()},
        "note": "2 cores shared by both ranks and the env service: overhead and what parallelism is left, "
                "not multi-GPU scaling",
    }


if __name__ == "__main__":
    print(json.dumps(run(Path("bench-results")), indent=2))
