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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from services.trainer.config import RolloutSettings, TrainConfig
from shared.client import RETRY_STATUS, ServiceError
from shared.config import url_list
from shared.policy_client import PolicyClient
from shared.schemas import GenerateItem, GenerateRequest, GenerateResponse
from shared.teacher_client import TeacherReplicas

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
    """The policy service's adapter version that sampled them (None: local); with replicas that
    serve different version numbers for the same adapter, the first synced replica's."""
    versions: list[int] | None = None
    """Per item, the version of the replica that sampled it (None: local)."""


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
    """Rollouts sampled by the policy service (`rollout.engine: service`), version-checked.

    `rollout.url` may name several replicas (a list, or commas). `sync` uploads the adapter to
    each and waits until each serves exactly it; `sample` spreads its `/v1/generate` batches over
    the replicas that did, in parallel, and checks every reply against the version that replica
    synced. A replica that could not be synced (down, too slow) or fails mid-rollout is left out
    until the next `sync` re-uploads to it; only when none is left does the rollout fail.
    """

    name = "service"

    def __init__(self, policy, settings: RolloutSettings, fingerprint: str | None = None,
                 client: PolicyClient | None = None, greedy: bool = False, start: int = 0):
        self.policy = policy
        self.settings = settings
        self.greedy = greedy
        self.clients = [client] if client is not None else [
            PolicyClient(u, timeout=settings.timeout_s, retries=settings.retries) for u in url_list(settings.url)]
        self.client = self.clients[0]
        self.replicas = TeacherReplicas([], clients=self.clients, start=start)  # its spreading and fan-out
        self._next = start
        self._lock = threading.Lock()
        self.synced: dict[int, tuple[int, str]] = {}
        """replica index -> (adapter version, checkpoint id) it serves for us; empty until `sync`."""
        self._suppressed = set(getattr(policy, "suppress_ids", None) or [])
        self._check(fingerprint)

    @property
    def version(self) -> int | None:
        """The adapter version the (first synced) replica serves for us; None before `sync`."""
        return self.synced[min(self.synced)][0] if self.synced else None

    @property
    def checkpoint_id(self) -> str | None:
        return self.synced[min(self.synced)][1] if self.synced else None

    def sync_state(self) -> dict[int, tuple[int, str]]:
        """What `sync` established, for the other data-parallel ranks (`adopt`)."""
        return dict(self.synced)

    def adopt(self, state: dict[int, tuple[int, str]]) -> None:
        self.synced = dict(state)

    def _url(self, i: int) -> str:
        return self.clients[i].base_url

    def _check(self, fingerprint: str | None) -> None:
        """Fail at start-up, not mid-run: each URL must be a policy service on our tokenizer.
        A replica that is not up yet is only warned about (sync re-tries it); none up fails."""
        def info(c):
            c.wait_ready(timeout=self.settings.sync_timeout_s)
            return c.info()

        infos = self.replicas.each(info)
        if all(isinstance(i, ServiceError) for i in infos):
            raise infos[0]
        for i, info in enumerate(infos):
            if isinstance(info, ServiceError):
                log.warning("policy replica %s is not up (%s): left out until a sync reaches it", self._url(i), info)
                continue
            if info.merge.method != "latest":
                raise ValueError(f"rollout.url={self._url(i)} is a teacher (merge method {info.merge.method}), not a "
                                 "policy service: start one with `gtr policy serve` (it serves the newest adapter unmerged)")
            if fingerprint and info.tokenizer_fingerprint and info.tokenizer_fingerprint != fingerprint:
                raise ValueError(f"the policy service at {self._url(i)} ({info.base_model}) uses another tokenizer "
                                 f"({info.tokenizer_fingerprint} != {fingerprint}); serve it on the trainer's model.path")
            log.info("policy service %s: %s backend, base %s, version %d", self._url(i), info.backend, info.base_model,
                     info.version)

    def sync(self, step: int) -> dict[str, Any]:
        """Upload the trainer's adapter to every replica and wait (bounded) until each serves
        exactly it. Replicas that do not are left out of this rollout (and warned about)."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gtr-policy-adapter-") as tmp:
            self.policy.save_adapter(tmp)
            ups = self.replicas.each(lambda c: c.upload_adapter(Path(tmp), step))
        for r in ups:  # a refused upload is our bug or a misconfiguration, not an outage
            if isinstance(r, ServiceError) and r.status is not None and r.status not in RETRY_STATUS:
                raise r
        deadline = time.monotonic() + self.settings.sync_timeout_s
        pending = {i: up.checkpoint_id for i, up in enumerate(ups) if not isinstance(up, ServiceError)}
        synced: dict[int, tuple[int, str]] = {}
        infos: dict[int, Any] = {}
        while pending:
            for i, ckpt in list(pending.items()):
                try:
                    info = infos[i] = self.clients[i].info()
                except ServiceError as e:
                    if e.status is not None and e.status not in RETRY_STATUS:
                        raise
                    continue
                if info.served_checkpoints == [ckpt]:
                    synced[i] = (info.version, ckpt)
                    del pending[i]
            if pending and time.monotonic() > deadline:
                break
            if pending:
                time.sleep(0.05)
        failed = {i: (ups[i] if isinstance(ups[i], ServiceError) else infos.get(i)) for i in range(len(ups))
                  if i not in synced}
        if not synced:
            i = next(iter(failed))
            raise PolicySyncError(
                f"the policy service at {self._url(i)} did not serve the adapter of update {step} within "
                f"{self.settings.sync_timeout_s:.0f}s ({self._why(failed[i])}); raise rollout.sync_timeout_s or check "
                "its log" + (f" (and the {len(failed) - 1} other replica(s))" if len(failed) > 1 else ""))
        for i, why in failed.items():
            log.warning("policy replica %s left out of this rollout: it did not serve the adapter of update %d within "
                        "%.0fs (%s)", self._url(i), step, self.settings.sync_timeout_s, self._why(why))
        self.synced = synced
        info = infos[min(synced)]
        stats = info.last_merge.stats if info.last_merge else None
        m = {"rollout/policy_version": self.version, "rollout/sync_s": time.perf_counter() - t0,
             "rollout/policy_replicas_synced": len(synced)}
        if stats is not None and stats.apply_seconds is not None:
            m["rollout/sync_apply_s"] = float(stats.apply_seconds)
        log.info("policy service serves version %d (%s, sync: %s) on %d of %d replica(s)", self.version,
                 self.checkpoint_id, stats.sync if stats is not None else "?", len(synced), len(self.clients))
        return m

    @staticmethod
    def _why(x) -> str:
        if isinstance(x, ServiceError) or x is None:
            return str(x) if x is not None else "unreachable"
        error = x.last_merge_error
        return f"serving {x.served_checkpoints}, version {x.version}" + (f"; last error: {error}" if error else "")

    def sample(self, messages, prompts, temperature, max_new_tokens, seeds) -> Samples:
        if not self.synced:
            raise PolicySyncError("the policy service was never synced with the trainer's adapter (call sync first)")
        items = [GenerateItem(messages=m, max_new_tokens=max_new_tokens, temperature=0.0 if self.greedy else temperature,
                              top_p=1.0, seed=int(s)) for m, s in zip(messages, seeds, strict=True)]
        bs = self.settings.batch_size
        batches = [GenerateRequest(items=items[i:i + bs]) for i in range(0, len(items), bs)]
        order = sorted(self.synced)
        firsts = [order[(self._next + k) % len(order)] for k in range(len(batches))]
        self._next += len(batches)
        if len(order) > 1 and len(batches) > 1:
            replies = list(self.replicas._executor().map(self._generate, batches, firsts))
        else:
            replies = [self._generate(b, f) for b, f in zip(batches, firsts, strict=True)]
        tokens, logprobs, versions = [], [], []
        for r in replies:
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
                versions.append(r.teacher_version)
        return Samples(tokens, logprobs, versions[0] if len(set(versions)) == 1 else self.version, versions)

    def _generate(self, request: GenerateRequest, first: int) -> GenerateResponse:
        """One batch on replica `first`; on another synced replica while it is unreachable (a
        generate only reads, so re-sending it is safe). Every reply is checked against the
        version its replica synced."""
        last: ServiceError | None = None
        with self._lock:  # batches run in parallel threads, and a failure edits `synced`
            candidates = [first] + [j for j in sorted(self.synced) if j != first]
        for i in candidates:
            with self._lock:
                synced = self.synced.get(i)
            if synced is None:
                continue
            try:
                r = self.clients[i].generate(request)
            except ServiceError as e:
                if e.status is not None and e.status not in RETRY_STATUS:
                    raise
                log.warning("policy replica %s failed a /v1/generate (%s): left out until the next sync", self._url(i), e)
                with self._lock:
                    self.synced.pop(i, None)
                last = e
                continue
            version = synced[0]
            if r.teacher_version != version:
                raise StalePolicyError(
                    f"the policy service at {self._url(i)} sampled with adapter version {r.teacher_version}, but "
                    f"the trainer synced version {version} ({synced[1]}): another client uploaded to "
                    "it, or it restarted on another store. Refusing the stale rollout.")
            return r
        raise last or PolicySyncError("no synced policy replica left")

    def close(self) -> None:
        self.replicas.close()


def make_sampler(cfg: TrainConfig, policy, fingerprint: str | None = None, rank: int = 0) -> Sampler:
    if cfg.rollout.engine == "service":
        return ServiceSampler(policy, cfg.rollout, fingerprint, start=rank)  # ranks begin on different replicas
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
