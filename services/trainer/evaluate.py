"""`gtr eval`: N episodes (fixed seeds) with a base model or an adapter, greedy or sampled.

Reports success rate, mean return, format-valid rate, and the same per ALFWorld task type
(the env's info field `task_type`, where it gives one).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from services.trainer.config import ModelSettings
from services.trainer.envpool import EnvPool
from services.trainer.policy import Policy
from services.trainer.spans import decode_output
from shared.chat import encode_prompt
from shared.prompting import observation_messages

log = logging.getLogger(__name__)


def evaluate(model_path: str, env_url: str, env_id: str, episodes: int = 20, adapter: str | None = None,
             greedy: bool = True, temperature: float = 1.0, max_new_tokens: int = 64, max_steps: int = 50,
             seed: int = 10_000, num_envs: int = 4, options: dict[str, Any] | None = None, device: str = "auto",
             policy: Policy | None = None) -> dict[str, Any]:
    """Run `episodes` episodes (seeds seed, seed+1, ...); returns the report as a dict. Sampled
    or greedy, the same arguments give the same report."""
    t0 = time.perf_counter()
    policy = policy or Policy(model_path, ModelSettings(device=device, lora={"dropout": 0.0}), adapter=adapter)
    n = max(1, min(num_envs, episodes))
    pool = EnvPool(env_url, env_id, n, options)
    records: list[dict[str, Any]] = []
    try:
        # Sampling draws from the torch RNG seeded from the eval seeds (the caller's RNG state is
        # restored afterwards): a sampled evaluation is as reproducible as a greedy one.
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            torch.manual_seed(seed)
            cur = pool.open([seed + i for i in range(n)])
            next_episode = n
            episode_of = list(range(n))
            active = list(range(n))
            stats = [{"return": 0.0, "steps": 0, "format_ok": 0} for _ in range(n)]
            while active:
                prompts = [encode_prompt(policy.processor, observation_messages(cur[e].observation)) for e in active]
                comps = policy.generate(prompts, temperature, max_new_tokens, greedy=greedy)
                texts = [decode_output(policy.tokenizer, c) for c in comps]
                results = pool.step(texts, which=active)
                still = []
                for e, r in zip(active, results, strict=True):
                    st = stats[e]
                    st["return"] += r.reward
                    st["steps"] += 1
                    st["format_ok"] += bool(r.info.get("format_ok"))
                    done = r.terminated or r.truncated or st["steps"] >= max_steps
                    if done:
                        records.append({"seed": seed + episode_of[e], "won": bool(r.info.get("won")),
                                        "return": st["return"], "steps": st["steps"],
                                        "format_ok_rate": st["format_ok"] / st["steps"],
                                        "task_type": r.info.get("task_type"), "cut_off": not (r.terminated or r.truncated),
                                        "goal_condition_rate": r.info.get("goal_condition_rate")})
                        if next_episode < episodes:
                            episode_of[e] = next_episode
                            cur[e] = pool.reset(e, seed + next_episode)
                            next_episode += 1
                            stats[e] = {"return": 0.0, "steps": 0, "format_ok": 0}
                            still.append(e)
                    else:
                        cur[e] = r
                        still.append(e)
                active = still
    finally:
        pool.close()
    records.sort(key=lambda r: r["seed"])
    total_steps = sum(r["steps"] for r in records)
    report: dict[str, Any] = {
        "env_id": env_id, "model": str(model_path), "adapter": str(adapter) if adapter else None,
        "greedy": greedy, "temperature": None if greedy else temperature, "episodes": len(records),
        "success_rate": float(np.mean([r["won"] for r in records])),
        "mean_return": float(np.mean([r["return"] for r in records])),
        "format_ok_rate": sum(r["format_ok_rate"] * r["steps"] for r in records) / max(1, total_steps),
        "mean_steps": float(np.mean([r["steps"] for r in records])),
        "seconds": time.perf_counter() - t0,
    }
    gcs = [r["goal_condition_rate"] for r in records if r["goal_condition_rate"] is not None]
    if gcs:  # ALFWorld
        report["mean_goal_condition_rate"] = float(np.mean(gcs))
    by_type: dict[str, list[dict]] = {}
    for r in records:
        if r["task_type"]:
            by_type.setdefault(str(r["task_type"]), []).append(r)
    report["per_task_type"] = {k: {"episodes": len(v), "success_rate": float(np.mean([r["won"] for r in v])),
                                   "mean_return": float(np.mean([r["return"] for r in v]))}
                               for k, v in sorted(by_type.items())}
    report["per_episode"] = records
    return report
