"""Where rollout tokens come from: the trainer itself (`local`) or the policy service (`service`).

Both samplers answer `sample(messages, prompts, temperature, max_new_tokens, seeds)` with the
sampled token ids; the service one also returns the engine's log-prob of each token and the
adapter version that sampled them. Whatever samples, PPO stays exact: the rollout re-scores
every sampled token in fp32 under the stored prompt (`Policy.score`), and that is the old
log-prob. The sampler's own log-probs only feed the mismatch metrics and the optional truncated
importance weight (`rollout.tis_cap`, as verl and slime do for vLLM rollouts).

The service handshake (DESIGN §3.4): before each rollout the trainer uploads its adapter
(`sync`), waits until `/v1/teacher` says exactly that checkpoint is served, and records the
version. Every `/v1/generate` reply must name that version: anything else is a
`StalePolicyError`, so one rollout never mixes two adapter versions.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from services.trainer.config import RolloutSettings, TrainConfig
from shared.client import ServiceError
from shared.policy_client import PolicyClient
from shared.schemas import GenerateItem, GenerateRequest

log = logging.getLogger(__name__)


class StalePolicyError(RuntimeError):
    """The policy service answered with another adapter version than the one the trainer synced."""


class PolicySyncError(RuntimeError):
    """The policy service did not serve the uploaded adapter within `rollout.sync_timeout_s`."""


@dataclass
class Samples:
    tokens: list[list[int]]
    """Per item, the sampled completion ids (ending with EOS when the model stopped)."""
    logprobs: list[list[float]] | None = None
    """Per item and token, the sampler's log-prob at the sampling temperature (None: local)."""
    version: int | None = None
    """The policy service's adapter version that sampled them (None: local)."""


class Sampler(Protocol):
    name: str

    def sync(self, step: int) -> dict[str, Any]:
        """Make the sampler serve the trainer's current weights; returns metrics."""

    def sample(self, messages: Sequence[list[dict[str, Any]]], prompts: Sequence[dict[str, torch.Tensor]],
               temperature: float, max_new_tokens: int, seeds: Sequence[int]) -> Samples: ...

    def close(self) -> None: ...


class LocalSampler:
    """transformers `generate` in the trainer's own process (`rollout.engine: local`)."""

    name = "local"

    def __init__(self, policy, greedy: bool = False):
        self.policy = policy
        self.greedy = greedy
        """Argmax decoding (tests and greedy comparisons; PPO samples)."""

    def sync(self, step: int) -> dict[str, Any]:
        return {}

    def sample(self, messages, prompts, temperature, max_new_tokens, seeds) -> Samples:
        # The local sampler draws from the torch RNG the update seeded (today's behaviour).
        return Samples(self.policy.generate(prompts, temperature, max_new_tokens, greedy=self.greedy))

    def close(self) -> None:
        pass


class ServiceSampler:
    """Rollouts sampled by the policy service (`rollout.engine: service`), version-checked."""

    name = "service"

    def __init__(self, policy, settings: RolloutSettings, fingerprint: str | None = None,
                 client: PolicyClient | None = None, greedy: bool = False):
        self.policy = policy
        self.settings = settings
        self.greedy = greedy
        self.client = client or PolicyClient(settings.url, timeout=settings.timeout_s, retries=settings.retries)
        self.version: int | None = None
        """The adapter version the service serves for us; None until the first `sync`."""
        self._suppressed = set(getattr(policy, "suppress_ids", None) or [])
        self.checkpoint_id: str | None = None
        self._check(fingerprint)

    def _check(self, fingerprint: str | None) -> None:
        """Fail at start-up, not mid-run: the URL must be a policy service on our tokenizer."""
        self.client.wait_ready(timeout=self.settings.sync_timeout_s)
        info = self.client.info()
        if info.merge.method != "latest":
            raise ValueError(f"rollout.url={self.settings.url} is a teacher (merge method {info.merge.method}), not a "
                             "policy service: start one with `gtr policy serve` (it serves the newest adapter unmerged)")
        if fingerprint and info.tokenizer_fingerprint and info.tokenizer_fingerprint != fingerprint:
            raise ValueError(f"the policy service at {self.settings.url} ({info.base_model}) uses another tokenizer "
                             f"({info.tokenizer_fingerprint} != {fingerprint}); serve it on the trainer's model.path")
        log.info("policy service: %s backend, base %s, version %d", info.backend, info.base_model, info.version)

    def sync(self, step: int) -> dict[str, Any]:
        """Upload the trainer's adapter and wait (bounded) until the service serves exactly it."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gtr-policy-adapter-") as tmp:
            self.policy.save_adapter(tmp)
            up = self.client.upload_adapter(Path(tmp), step)
        deadline = time.monotonic() + self.settings.sync_timeout_s
        while True:
            info = self.client.info()
            if info.served_checkpoints == [up.checkpoint_id]:
                break
            if time.monotonic() > deadline:
                error = info.last_merge_error
                raise PolicySyncError(
                    f"the policy service at {self.settings.url} did not serve checkpoint {up.checkpoint_id} within "
                    f"{self.settings.sync_timeout_s:.0f}s (serving {info.served_checkpoints}, version {info.version}"
                    f"{'; last error: ' + error if error else ''}); raise rollout.sync_timeout_s or check its log")
            time.sleep(0.05)
        self.version, self.checkpoint_id = info.version, up.checkpoint_id
        stats = info.last_merge.stats if info.last_merge else None
        m = {"rollout/policy_version": info.version, "rollout/sync_s": time.perf_counter() - t0}
        if stats is not None and stats.apply_seconds is not None:
            m["rollout/sync_apply_s"] = float(stats.apply_seconds)
        log.info("policy service serves version %d (%s, sync: %s)", info.version, up.checkpoint_id,
                 stats.sync if stats is not None else "?")
        return m

    def sample(self, messages, prompts, temperature, max_new_tokens, seeds) -> Samples:
        if self.version is None:
            raise PolicySyncError("the policy service was never synced with the trainer's adapter (call sync first)")
        items = [GenerateItem(messages=m, max_new_tokens=max_new_tokens, temperature=0.0 if self.greedy else temperature,
                              top_p=1.0, seed=int(s)) for m, s in zip(messages, seeds, strict=True)]
        tokens, logprobs = [], []
        bs = self.settings.batch_size
        for i in range(0, len(items), bs):
            r = self.client.generate(GenerateRequest(items=items[i:i + bs]))
            if r.teacher_version != self.version:
                raise StalePolicyError(
                    f"the policy service at {self.settings.url} sampled with adapter version {r.teacher_version}, but "
                    f"the trainer synced version {self.version} ({self.checkpoint_id}): another client uploaded to "
                    "it, or it restarted on another store. Refusing the stale rollout.")
            for res in r.items:
                if len(res.logprobs) != len(res.token_ids):
                    raise ServiceError("policy", "POST", "/v1/generate", None,
                                       f"{len(res.token_ids)} tokens but {len(res.logprobs)} log-probs")
                vision = sorted(set(res.token_ids) & self._suppressed)
                if vision:  # the trainer scores these at -1e9 and the next forward would misread them
                    raise ServiceError("policy", "POST", "/v1/generate", None,
                                       f"the engine sampled vision special tokens {vision}: it must suppress them")
                tokens.append(list(res.token_ids))
                logprobs.append([float(x) for x in res.logprobs])
        return Samples(tokens, logprobs, self.version)

    def close(self) -> None:
        self.client.close()


def make_sampler(cfg: TrainConfig, policy, fingerprint: str | None = None) -> Sampler:
    if cfg.rollout.engine == "service":
        return ServiceSampler(policy, cfg.rollout, fingerprint)
    return LocalSampler(policy)


# ------------------------------------------------------------------ the sampler/trainer mismatch


def weighted_logprob(token_lps: Sequence[float], n_thought: int, thought_coef: float) -> float:
    """lambda * sum(thought) + sum(action): the sequence log-prob PPO's ratio uses (DESIGN §4)."""
    lps = np.asarray(token_lps, dtype=np.float64)
    return float(thought_coef * lps[:n_thought].sum() + lps[n_thought:].sum())


def logprob_gap(steps) -> dict[str, Any]:
    """Per token |log p_sampler - log p_trainer| over a rollout's steps that carry both."""
    gaps = [g for s in steps if s.sampler_gap is not None for g in s.sampler_gap]
    if not gaps:
        return {}
    a = np.abs(np.asarray(gaps, dtype=np.float64))
    return {"rollout/sampler_logprob_gap_mean": float(a.mean()), "rollout/sampler_logprob_gap_max": float(a.max()),
            "rollout/sampler_tokens": int(a.size)}


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Truncated importance weights min(pi_trainer / pi_sampler, cap) per sample (sequence-level,
    like the PPO ratio), detached; (weights, metrics). Samples without a sampler log-prob (NaN) get 1."""
    log_w = (old_logp - sampler_logp).double()
    w = torch.where(torch.isnan(log_w), torch.ones_like(log_w), log_w.exp())
    clipped = w > cap
    w = w.clamp(max=cap).float()
    return w, {"ppo/tis_weight_mean": float(w.mean()), "ppo/tis_clipped_frac": float(clipped.float().mean()),
               "ppo/tis_weight_min": float(w.min())}


def nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)
