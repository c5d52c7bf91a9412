"""Rollouts: `num_envs` sessions stepped together, generation batched across them.

Each step stores what PPO and the teacher need later (DESIGN §4): the exact encoded prompt
and image of the rollout, the raw image as uint8, the chat (for teacher requests), the
sampled tokens and their thought/action split, the old log-prob, the value, the reward,
terminated / truncated kept apart, and (after guidance) the teacher version and KL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from services.trainer.config import TrainConfig
from services.trainer.envpool import EnvPool, EnvResult
from services.trainer.guidance import Guidance, make_guidance
from services.trainer.policy import Policy
from services.trainer.sampler import LocalSampler, Sampler, logprob_gap, weighted_logprob
from services.trainer.spans import split_spans
from services.trainer.stored_prompt import StoredPrompt, store_prompt
from shared.chat import encode_prompt
from shared.codecs import b64_to_image, image_to_array
from shared.prompting import observation_messages

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (base seed, update, env, episode, ...): same parts, same seed."""
    return int(np.random.SeedSequence([int(p) % (2**32) for p in parts]).generate_state(1)[0] % (2**31 - 1))


@dataclass
class RolloutStep:
    prompt: StoredPrompt
    """The exact prompt ids and image of the rollout (pixel values recomputed bit-identically on use)."""
    messages: list[dict[str, Any]]
    """The chat (base64 image + instruction) the policy saw; sent to the teacher as is."""
    image: np.ndarray | None
    """The observation image, uint8 HxWx3 (never float32: DESIGN §5.7)."""
    tokens: list[int]
    """Sampled completion ids (ending with the EOS token when the model stopped)."""
    text: str
    """The output as sent to the env."""
    n_thought: int
    """Completion tokens [0, n_thought) are the thought span."""
    thought_ok: bool
    logprob: float
    """Old log-prob: lambda * sum(thought) + sum(action), fp32, at the sampling temperature."""
    value: float
    student_thought_lp: torch.Tensor | None
    """The student's log-prob of each thought token at the KL temperature (KL guidance)."""
    env_reward: float
    reward: float
    """Env reward + format reward: what GAE sees."""
    terminated: bool
    truncated: bool
    format_ok: bool
    info: dict[str, Any]
    env_index: int
    next_value: float = 0.0
    """V(s_{t+1}): next step's value, the final observation's value on truncation, the bootstrap at the end."""
    kl: float | None = None
    kl_tokens: list[float] | None = None
    teacher_version: int | None = None
    sampler_logprob: float | None = None
    """The policy service's log-prob of the sample, weighted like `logprob` (None: sampled locally)."""
    sampler_gap: list[float] | None = None
    """Per token, the policy service's log-prob minus the trainer's re-score (None: sampled locally)."""
    sampler_version: int | None = None
    """The policy service's adapter version that sampled this step."""


@dataclass
class Rollout:
    steps: list[list[RolloutStep]]
    """[T][N]."""
    episodes: list[dict[str, Any]] = field(default_factory=list)
    """Episodes that ended during this rollout: return, length, won, task_type."""
    cut_off: int = 0
    """Episodes still running when the rollout ended (abandoned: every update starts fresh ones)."""

    def flat(self) -> list[RolloutStep]:
        return [s for row in self.steps for s in row]


def decode_image(obs_image: str | None) -> np.ndarray | None:
    return None if not obs_image else image_to_array(b64_to_image(obs_image))


def collect(policy: Policy, pool: EnvPool, cfg: TrainConfig, update: int,
            on_step: Callable[[int], None] | None = None, guidance: Guidance | None = None,
            sampler: Sampler | None = None, first_env: int = 0) -> Rollout:
    """One update's rollout. Episodes start fresh each update with seeds derived from
    (cfg.seed, update, env, episode), so a resumed run replays the same episodes. `sampler`
    draws the tokens (default: the policy itself); the old log-prob is always the policy's own.
    Under data parallelism the pool holds this rank's envs, global indices first_env,
    first_env + 1, ...: an env's episodes are the same at any world size."""
    sampler = sampler or LocalSampler(policy)
    n, T = pool.num_envs, cfg.env.num_steps
    proc, tok = policy.processor, policy.tokenizer
    temp = cfg.generation.temperature
    kl_temp = (guidance or make_guidance(cfg)).student_kl_temperature
    episode_no = [0] * n
    current: list[EnvResult] = pool.open([derive_seed(cfg.seed, update, first_env + e, 0) for e in range(n)])
    ep_return, ep_len = [0.0] * n, [0] * n
    rollout = Rollout(steps=[])
    for t in range(T):
        messages = [observation_messages(c.observation) for c in current]
        prompts = [encode_prompt(proc, m) for m in messages]
        sampled = sampler.sample(messages, prompts, temp, cfg.generation.max_new_tokens,
                                 [derive_seed(cfg.seed, update, e, t, 5) for e in range(n)])
        completions = sampled.tokens
        spans = [split_spans(tok, c) for c in completions]
        with torch.no_grad():
            sc = policy.score(prompts, completions, [s.n_thought for s in spans], temp, cfg.ppo.thought_coef,
                              kl_temperature=kl_temp)
        texts = [sp.text for sp in spans]  # the text the split parsed is the text the env executes
        results = pool.step(texts)
        row: list[RolloutStep] = []
        truncated_final: dict[int, dict[str, torch.Tensor]] = {}
        for e, r in enumerate(results):
            fmt = bool(r.info.get("format_ok", False))
            image = decode_image(current[e].observation.image)
            shaped = r.reward
            if "env_error" not in r.info:  # the env's failure is not the agent's format
                shaped += cfg.reward.format_ok if fmt else cfg.reward.format_bad
            row.append(RolloutStep(
                prompt=store_prompt(prompts[e], image), messages=messages[e], image=image,
                tokens=completions[e], text=texts[e], n_thought=spans[e].n_thought, thought_ok=spans[e].thought_ok,
                logprob=float(sc.logprob[e]), value=float(sc.values[e]),
                student_thought_lp=sc.thought_logprobs[e] if sc.thought_logprobs is not None else None,
                env_reward=float(r.reward), reward=float(shaped), terminated=bool(r.terminated),
                truncated=bool(r.truncated), format_ok=fmt, info=r.info, env_index=first_env + e))
            if sampled.logprobs is not None:  # the sampler/trainer mismatch (DESIGN §3.4)
                s_lp = sampled.logprobs[e]
                row[-1].sampler_logprob = weighted_logprob(s_lp, spans[e].n_thought, cfg.ppo.thought_coef)
                row[-1].sampler_gap = (torch.tensor(s_lp) - sc.token_logprobs[e].float().cpu()).tolist()
                row[-1].sampler_version = sampled.versions[e] if sampled.versions else sampled.version
            ep_return[e] += r.reward
            ep_len[e] += 1
            if r.terminated or r.truncated:
                rollout.episodes.append({"return": ep_return[e], "length": ep_len[e], "won": bool(r.info.get("won", False)),
                                         "task_type": r.info.get("task_type"), "env_index": first_env + e})
                if r.truncated and not r.terminated:
                    # Bootstrap through the time limit: the value of the final observation.
                    truncated_final[e] = encode_prompt(proc, observation_messages(r.observation))
                ep_return[e], ep_len[e] = 0.0, 0
                episode_no[e] += 1
                current[e] = pool.reset(e, derive_seed(cfg.seed, update, first_env + e, episode_no[e]))
            else:
                current[e] = r
        if truncated_final or getattr(policy, "lockstep", None) is not None:  # sharded base: all ranks or none
            with torch.no_grad():
                vals = policy.values_together(list(truncated_final.values()), prompts[0])
            for e, v in zip(truncated_final, vals.tolist(), strict=True):
                row[e].next_value = float(v)
        if rollout.steps:
            for prev, now in zip(rollout.steps[-1], row, strict=True):
                if not (prev.terminated or prev.truncated):
                    prev.next_value = now.value
        rollout.steps.append(row)
        if on_step:
            on_step(t)
    # Bootstrap the steps the rollout cut off.
    last = rollout.steps[-1]
    open_envs = [e for e in range(n) if not (last[e].terminated or last[e].truncated)]
    rollout.cut_off = len(open_envs)
    if open_envs or getattr(policy, "lockstep", None) is not None:
        stand_in = prompts[0]
        prompts = [encode_prompt(proc, observation_messages(current[e].observation)) for e in open_envs]
        with torch.no_grad():
            vals = policy.values_together(prompts, stand_in)
        for e, v in zip(open_envs, vals.tolist(), strict=True):
            last[e].next_value = float(v)
    return rollout


def slim(rollout: Rollout) -> Rollout:
    """The rollout without prompts, chats, images and per-token tensors: what its metrics read,
    small enough to gather from every rank to rank 0."""
    steps = [[replace(s, prompt=None, messages=[], image=None, student_thought_lp=None) for s in row]
             for row in rollout.steps]
    return Rollout(steps=steps, episodes=list(rollout.episodes), cut_off=rollout.cut_off)


def merge(rollouts: list[Rollout]) -> Rollout:
    """Ranks' rollouts side by side: row t holds every rank's envs (rank order = env order)."""
    steps = [[s for r in rollouts for s in r.steps[t]] for t in range(len(rollouts[0].steps))]
    return Rollout(steps=steps, episodes=[e for r in rollouts for e in r.episodes],
                   cut_off=sum(r.cut_off for r in rollouts))


def rollout_metrics(rollout: Rollout) -> dict[str, Any]:
    flat = rollout.flat()
    eps = rollout.episodes
    m: dict[str, Any] = {
        "rollout/episodes": len(eps),
        "rollout/episodes_cut_off": rollout.cut_off,
        # over the episodes that ended (as RL4VLM reports it) ...
        "rollout/success_rate": float(np.mean([e["won"] for e in eps])) if eps else 0.0,
        # ... and over all episodes of the update, the abandoned ones counted as not won
        "rollout/success_rate_all": float(sum(e["won"] for e in eps) / max(1, len(eps) + rollout.cut_off)),
        "rollout/mean_return": float(np.mean([e["return"] for e in eps])) if eps else 0.0,
        "rollout/mean_episode_length": float(np.mean([e["length"] for e in eps])) if eps else 0.0,
        "rollout/format_ok_rate": float(np.mean([s.format_ok for s in flat])),
        "rollout/thought_ok_rate": float(np.mean([s.thought_ok for s in flat])),
        "rollout/reward_mean": float(np.mean([s.reward for s in flat])),
        "rollout/env_reward_mean": float(np.mean([s.env_reward for s in flat])),
        "rollout/tokens_mean": float(np.mean([len(s.tokens) for s in flat])),
        "rollout/value_mean": float(np.mean([s.value for s in flat])),
        "rollout/env_errors": sum("env_error" in s.info for s in flat),
        **logprob_gap(flat),
    }
    by_type: dict[str, list[dict]] = {}
    for e in eps:
        if e.get("task_type"):
            by_type.setdefault(str(e["task_type"]), []).append(e)
    for k, v in sorted(by_type.items()):
        m[f"task/{k}/success_rate"] = float(np.mean([e["won"] for e in v]))
    return m
