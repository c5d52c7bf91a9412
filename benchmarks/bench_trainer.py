"""Seconds per PPO update, split into rollout / teacher / PPO, for guidance none, kl and sft on
the `tiny-cpu` preset, measured side by side in one run against the real env and teacher
services (uvicorn threads). The policy is the tiny model SFT-initialised by `gtr sft`, so its
outputs parse and the KL variant really scores thoughts.

Targets (the paper's efficiency claim): kl at most 1.25x none per update; kl cheaper than sft.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "kl", "sft")
UPDATES = 4  # the first update of each run is a warm-up and is not counted
ROUNDS = 2


def run(out_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from services.trainer.config import load_train_config
    from services.trainer.sft_init import SFTConfig, run_sft
    from services.trainer.train import train
    from shared.tiny_model import build_tiny_model
    from tests.trainer_services import running_services

    for name in ("httpx", "services", "shared"):
        logging.getLogger(name).setLevel(logging.WARNING)
    per_mode: dict[str, dict[str, list[float]]] = {m: {"rollout": [], "teacher": [], "ppo": [], "total": []} for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "tiny", seed=0, size="tiny")
        with running_services(None, None, teacher=False) as (env_url, _):
            sft = run_sft(SFTConfig(model={"path": str(base), "device": "cpu", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
                                    env={"url": env_url, "env_id": "numberline"}, lr=1e-2, out=str(tmp / "sft"), progress=False))
            with running_services(sft["out"], tmp / "store", teacher=True, env=False) as (_, teacher_url):
                t0 = time.perf_counter()
                for r in range(ROUNDS):
                    for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                        cfg = load_train_config(str(ROOT / "configs/tiny-cpu.yaml"), [
                            f"model.path={sft['out']}", f"env.url={env_url}", f"teacher.url={teacher_url}",
                            f"guidance.mode={mode}", f"updates={UPDATES}", f"run_dir={tmp / f'{mode}-{r}'}",
                            "trainer.port=0", "logging.progress=false", "logging.tensorboard=false",
                            "logging.samples_per_update=0", "generation.max_new_tokens=48"])
                        train(cfg)
                        rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
                        for row in rows[1:]:
                            d = per_mode[mode]
                            d["rollout"].append(row["seconds_rollout"])
                            d["teacher"].append(row["seconds_teacher"])
                            d["ppo"].append(row["seconds_ppo"])
                            d["total"].append(row["seconds_update"])
                        if mode == "kl":
                            per_mode[mode].setdefault("kl_mean", []).extend(x["kl_mean"] for x in rows)
                            per_mode[mode].setdefault("guided_frac", []).extend(x["teacher/guided_frac"] for x in rows)
                        if mode == "sft":
                            per_mode[mode].setdefault("parse_rate", []).extend(x["sft/teacher_parse_rate"] for x in rows)
                wall = time.perf_counter() - t0
    med = {m: {k: round(statistics.median(v), 4) for k, v in d.items() if v} for m, d in per_mode.items()}
    kl_over_none = med["kl"]["total"] / med["none"]["total"]
    kl_over_sft = med["kl"]["total"] / med["sft"]["total"]
    # The runs' policies drift apart after their first update (different losses), so their
    # rollouts differ in length; the teacher phase alone, added to the unguided update, is the
    # cost of the guidance itself.
    kl_overhead = (med["none"]["total"] + med["kl"]["teacher"]) / med["none"]["total"]
    sft_overhead = (med["none"]["total"] + med["sft"]["teacher"] + max(0.0, med["sft"]["ppo"] - med["none"]["ppo"])) \
        / med["none"]["total"]
    return {
        "what": "median seconds per PPO update on tiny-cpu (num_envs 8 x num_steps 10, max_new_tokens 48), "
                f"{ROUNDS} rounds x {UPDATES - 1} counted updates per mode, real env + teacher services on this CPU",
        "seconds_per_update": med,
        "kl_over_none": round(kl_over_none, 3),
        "kl_over_sft": round(kl_over_sft, 3),
        "guidance_overhead": {"kl": round(kl_overhead, 3), "sft": round(sft_overhead, 3),
                              "what": "(none's update + the mode's teacher phase [+ sft's extra PPO]) / none's update"},
        "targets": {"kl_over_none_max": 1.25, "kl_cheaper_than_sft": True},
        "meets_targets": {"kl_over_none": kl_over_none <= 1.25, "kl_cheaper_than_sft": kl_over_sft < 1.0,
                          "kl_overhead": kl_overhead <= 1.25, "kl_overhead_below_sft": kl_overhead < sft_overhead},
        "sft_init": {"demonstrations": sft["demonstrations"], "final_loss": round(sft["losses"][-1], 4)},
        "wall_seconds": round(wall, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(Path("bench-results")), indent=2))
