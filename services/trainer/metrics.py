"""Per-update metrics to `<run_dir>/metrics.jsonl` and TensorBoard, and trajectory samples.

Metric names live in namespaces (`rollout/`, `teacher/`, `ppo/`, `sft/`, `time/`, `task/`),
plus the step axis `update` and `env_steps`. metrics.jsonl holds one JSON object per update;
scripts read its older top-level keys (`success_rate`, `mean_return`, `format_ok_rate`,
`kl_mean`, `teacher_version`, `seconds_rollout`, `seconds_teacher`, `seconds_ppo`, and the
plot's `success_rate_all`, `seconds_update`): they are written beside the namespaced names as
aliases (`CONTRACT_ALIASES`), to the JSON file only, never as a second TensorBoard curve.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.trainer.rollout import RolloutStep

log = logging.getLogger(__name__)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


CONTRACT_ALIASES: dict[str, str] = {
    "success_rate": "rollout/success_rate",
    "success_rate_all": "rollout/success_rate_all",
    "mean_return": "rollout/mean_return",
    "format_ok_rate": "rollout/format_ok_rate",
    "kl_mean": "teacher/kl_mean",
    "teacher_version": "teacher/version",
    "seconds_rollout": "time/rollout_s",
    "seconds_teacher": "time/teacher_s",
    "seconds_ppo": "time/ppo_s",
    "seconds_update": "time/update_s",
}
"""metrics.jsonl contract key -> the namespaced metric it repeats."""


def with_contract_aliases(metrics: dict[str, Any]) -> dict[str, Any]:
    """The namespaced metrics plus the contract keys scripts read (None where the metric is absent)."""
    return {**metrics, **{alias: metrics.get(name) for alias, name in CONTRACT_ALIASES.items()}}


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError as e:  # tensorboard is a dependency; a broken install only loses TB
                log.warning("TensorBoard unavailable (%s); metrics go to metrics.jsonl only", e)

    def truncate_after(self, update: int) -> None:
        """On resume: drop lines of updates after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("update", 0) <= update]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, metrics: dict[str, Any]) -> None:
        """One update's namespaced metrics: to metrics.jsonl with the contract aliases, to TensorBoard without."""
        row = {k: _clean(v) for k, v in with_contract_aliases(metrics).items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = int(metrics["update"])
            for k, v in row.items():
                if k in CONTRACT_ALIASES or k == "update" or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_samples(run_dir: str | Path, update: int, steps: list[RolloutStep], n: int, tokenizer) -> None:
    """A few trajectories steps of this update: image (PNG), output, reward, per-token KL."""
    if n <= 0 or not steps:
        return
    out = Path(run_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    # Deterministic choice (spread over the batch) so samples are comparable between runs.
    picks = sorted(set(np.linspace(0, len(steps) - 1, num=min(n, len(steps))).round().astype(int).tolist()))
    with (out / f"update_{update:05d}.jsonl").open("w") as f:
        for j in picks:
            s = steps[j]
            image = None
            if s.image is not None:
                image = f"update_{update:05d}_{j}.png"
                Image.fromarray(s.image).save(out / image)
            text = next((p["text"] for p in s.messages[-1]["content"] if p.get("type") == "text"), "")
            kl_tokens = None
            if s.kl_tokens is not None:
                toks = tokenizer.convert_ids_to_tokens(s.tokens[:s.n_thought])
                kl_tokens = [[t, round(k, 5)] for t, k in zip(toks, s.kl_tokens, strict=True)]
            f.write(json.dumps({"update": update, "index": j, "env_index": s.env_index, "image": image, "prompt": text,
                                "output": s.text, "n_thought_tokens": s.n_thought, "thought_ok": s.thought_ok,
                                "reward": s.reward, "env_reward": s.env_reward, "format_ok": s.format_ok,
                                "terminated": s.terminated, "truncated": s.truncated, "logprob": s.logprob,
                                "value": s.value, "kl": s.kl, "kl_per_token": kl_tokens,
                                "teacher_version": s.teacher_version}) + "\n")
