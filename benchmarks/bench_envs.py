"""Points24 steps per second: in process vs through the env service with 32 sessions batched.

Both sides play the same seeded action stream (random legal-or-not tokens in the JSON answer
format, reset when an episode ends) for the same wall time. In process: `env.step` (parse, rules,
expert, the rendered PIL image). Service: `EnvClient.step_batch` over HTTP to `gtr env serve` in
its own process (parse, rules, expert, image, PNG + base64, JSON both ways, response parsing),
resets as their own calls. Target: the service keeps >= 50% of in-process throughput.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

N_SESSIONS = 32
SECONDS = float(os.environ.get("GTR_BENCH_SECONDS", 4.0))
TARGET_RATIO = 0.5


def _actions(seed: int):
    from services.envs.cardgames import Points24Env

    vocab = Points24Env().actions()
    rng = random.Random(seed)
    while True:
        yield json.dumps({"thoughts": "benchmark", "action": rng.choice(vocab)})


def in_process(seconds: float, encode: bool) -> dict:
    from services.envs.cardgames import Points24Env
    from services.envs.formula import solutions
    from services.envs.render import to_png_b64

    solutions.cache_clear()  # both sides start with a cold solver cache
    envs = [Points24Env() for _ in range(N_SESSIONS)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    actions = _actions(0)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for e in envs:
            r = e.step(next(actions))
            if encode:
                to_png_b64(r.observation.image)
            steps += 1
            if r.terminated or r.truncated:
                e.reset()
    elapsed = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(elapsed, 3), "steps_per_s": round(steps / elapsed, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_service(seconds: float) -> dict:
    from shared.env_client import EnvClient

    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "services.envs", "--port", str(port), "--uvicorn-log-level", "warning"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with EnvClient(f"http://127.0.0.1:{port}", retries=0) as client:
            client.wait_ready(60)
            sids = [client.create("points24", seed=i).session_id for i in range(N_SESSIONS)]
            actions = _actions(0)
            steps, batches, resets, t0 = 0, 0, 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                out = client.step_batch([(sid, next(actions)) for sid in sids])
                steps += len(out)
                batches += 1
                for sid, res in zip(sids, out, strict=True):
                    if res.error is not None:
                        raise RuntimeError(f"step failed: {res.error}")
                    if res.terminated or res.truncated:
                        client.reset(sid)
                        resets += 1
            elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    return {"steps": steps, "batches": batches, "resets": resets, "seconds": round(elapsed, 3),
            "steps_per_s": round(steps / elapsed, 1)}


def run(out_dir: Path) -> dict:
    service = through_service(SECONDS)
    local = in_process(SECONDS, encode=False)
    local_png = in_process(SECONDS, encode=True)
    ratio = service["steps_per_s"] / local["steps_per_s"]
    return {
        "benchmark": "points24 steps/s, in process vs env service (32 sessions, batched step)",
        "in_process": local,
        "in_process_with_png": local_png,
        "service_batched": service,
        "service_over_in_process": round(ratio, 3),
        "service_over_in_process_with_png": round(service["steps_per_s"] / local_png["steps_per_s"], 3),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "sessions": N_SESSIONS,
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    print(json.dumps(run(Path("bench-results")), indent=2))
