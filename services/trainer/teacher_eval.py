"""The merged teacher measured against the student (the paper's Figure 2), and the gate on it.

Every `eval.teacher_every` updates (and once before the first) the teacher plays the eval
episodes as a policy through `/v1/generate`, and the student plays the same episodes (same env
seeds) in process, both at the rollout temperature (or both greedy). The results go into that
update's metrics (`eval/teacher_success`, `eval/student_success`, `eval/teacher_version`) and,
one line per evaluation, into `<run_dir>/teacher_eval.jsonl` (update 0 included).

`guidance.gate: teacher_not_worse` reads the latest evaluation: guidance is skipped on the
updates where the teacher scored below the student.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from services.trainer.config import TrainConfig
from services.trainer.envpool import EnvPool
from services.trainer.spans import decode_output
from shared.chat import encode_prompt
from shared.prompting import observation_messages
from shared.schemas import GenerateItem

log = logging.getLogger(__name__)

Act = Callable[[list[list[dict[str, Any]]], list[int]], list[str]]
"""act(chats, episode_indices) -> output texts, one per chat (the episode index seeds a sampler)."""


def run_episodes(pool: EnvPool, act: Act, episodes: int, seed: int, max_steps: int) -> list[dict[str, Any]]:
    """Play episodes with seeds seed..seed+episodes-1 on the pool's sessions; one record each."""
    n = max(1, min(pool.num_envs, episodes))
    cur = pool.open([seed + i for i in range(n)])
    episode_of = list(range(n))
    steps = [0] * n
    returns = [0.0] * n
    next_episode = n
    active = list(range(n))
    records: list[dict[str, Any]] = []
    while active:
        texts = act([observation_messages(cur[e].observation) for e in active],
                    [episode_of[e] * 1000 + steps[e] for e in active])
        results = pool.step(texts, which=active)
        still = []
        for e, r, text in zip(active, results, texts, strict=True):
            steps[e] += 1
            returns[e] += r.reward
            if r.terminated or r.truncated or steps[e] >= max_steps:
                records.append({"seed": seed + episode_of[e], "won": bool(r.info.get("won")), "return": returns[e],
                                "steps": steps[e], "last_output": text})
                if next_episode < episodes:
                    episode_of[e], steps[e], returns[e] = next_episode, 0, 0.0
                    cur[e] = pool.reset(e, seed + next_episode)
                    next_episode += 1
                    still.append(e)
            else:
                cur[e] = r
                still.append(e)
        active = still
    return sorted(records, key=lambda r: r["seed"])


def student_act(policy, temperature: float, max_new_tokens: int, greedy: bool) -> Act:
    def act(chats, _keys):
        prompts = [encode_prompt(policy.processor, m) for m in chats]
        comps = policy.generate(prompts, temperature, max_new_tokens, greedy=greedy)
        return [decode_output(policy.tokenizer, c) for c in comps]
    return act


def teacher_act(link, tokenizer, temperature: float, max_new_tokens: int, greedy: bool, seed: int,
                versions: list[int]) -> Act:
    """The teacher as a policy. Its token ids are decoded with the student's tokenizer and the
    rollout's decoder, so equal tokens give the env equal text. Appends each reply's version."""
    def act(chats, keys):
        items = [GenerateItem(messages=m, max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                              seed=seed + k) for m, k in zip(chats, keys, strict=True)]
        res = link.generate(items)
        if res is None:
            raise TeacherEvalUnavailable("the teacher did not answer /v1/generate during the teacher eval")
        version, out = res
        versions.append(version)
        return [decode_output(tokenizer, r.token_ids) for r in out]
    return act


class TeacherEvalUnavailable(RuntimeError):
    pass


def _summary(records: list[dict[str, Any]]) -> dict[str, float]:
    return {"success": float(np.mean([r["won"] for r in records])),
            "return": float(np.mean([r["return"] for r in records]))}


def evaluate_teacher_and_student(cfg: TrainConfig, policy, link, update: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both policies on the eval seeds -> (metrics, the full record incl. per-episode results)."""
    e = cfg.eval
    temperature = cfg.generation.temperature
    pool = EnvPool(cfg.env.url, cfg.env.env_id, min(e.num_envs, e.episodes), cfg.env.options, cfg.env.timeout_s,
                   cfg.env.retries)
    versions: list[int] = []
    try:
        student = run_episodes(pool, student_act(policy, temperature, cfg.generation.max_new_tokens, e.greedy),
                               e.episodes, e.seed, e.max_steps)
        teacher: list[dict[str, Any]] | None = None
        try:
            if link is None:
                raise TeacherEvalUnavailable("no teacher configured (guidance none and no pushes)")
            teacher = run_episodes(pool, teacher_act(link, policy.tokenizer, temperature, cfg.generation.max_new_tokens,
                                                     e.greedy, e.seed, versions), e.episodes, e.seed, e.max_steps)
        except TeacherEvalUnavailable as exc:
            log.warning("teacher eval at update %d skipped: %s", update, exc)
            teacher = None
    finally:
        pool.close()
    s = _summary(student)
    m: dict[str, Any] = {"eval/student_success": s["success"], "eval/student_return": s["return"],
                         "eval/episodes": len(student)}
    if teacher is not None:
        t = _summary(teacher)
        # The version that served the episodes (a merge may land mid-eval: the oldest one is named,
        # and eval/teacher_version_max says if it changed).
        m.update({"eval/teacher_success": t["success"], "eval/teacher_return": t["return"],
                  "eval/teacher_version": min(versions), "eval/teacher_version_max": max(versions)})
    record = {"update": update, **m, "greedy": e.greedy, "temperature": None if e.greedy else temperature,
              "seeds": [e.seed, e.seed + e.episodes - 1], "student_episodes": student, "teacher_episodes": teacher}
    log.info("teacher eval at update %d: teacher (v%s) %s vs student %.3f over %d episodes", update,
             m.get("eval/teacher_version"), _fmt(m.get("eval/teacher_success")), s["success"], len(student))
    return m, record


def append_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / "teacher_eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def gate_open(gate: str, last_eval: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether this update is guided, and why. teacher_not_worse closes the gate exactly when the
    latest evaluation's teacher success is below the student's (ties and no evaluation yet: open)."""
    if gate == "none":
        return True, "no gate"
    if gate != "teacher_not_worse":
        raise ValueError(f"unknown guidance.gate {gate!r}")
    if not last_eval or last_eval.get("eval/teacher_success") is None:
        return True, "no teacher evaluation yet"
    t, s = last_eval["eval/teacher_success"], last_eval["eval/student_success"]
    if t < s:
        return False, f"teacher {t:.3f} < student {s:.3f} at update {last_eval.get('update')}"
    return True, f"teacher {t:.3f} >= student {s:.3f} at update {last_eval.get('update')}"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


class TeacherEvaluator:
    """The training loop's side: when to evaluate, the latest result, and the gate on it."""

    def __init__(self, cfg: TrainConfig, link, run_dir: str | Path):
        self.cfg, self.link, self.run_dir = cfg, link, Path(run_dir)
        self.last: dict[str, Any] | None = None
        path = self.run_dir / "teacher_eval.jsonl"
        if cfg.resume and path.exists():  # a resumed run gates on the evaluation it last made
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if lines:
                rec = json.loads(lines[-1])
                self.last = {k: v for k, v in rec.items() if k == "update" or k.startswith("eval/")}

    @property
    def enabled(self) -> bool:
        return self.cfg.eval.teacher_every > 0

    def due(self, update: int) -> bool:
        return self.enabled and update % self.cfg.eval.teacher_every == 0

    def run(self, policy, update: int) -> dict[str, Any]:
        if self.link is not None:
            self.link.await_pushed_merge()  # evaluate the teacher that includes this update's checkpoint
        m, record = evaluate_teacher_and_student(self.cfg, policy, self.link, update)
        append_record(self.run_dir, record)
        self.last = {"update": update, **m}
        return m

    def gate(self) -> tuple[bool, str]:
        return gate_open(self.cfg.guidance.gate, self.last)
