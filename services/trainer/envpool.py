"""`num_envs` sessions on the env service (DESIGN §3.1), stepped together: a pool of session
ids over `shared.env_client.EnvClient`, which declares the retry policy of every route (a
step or a reset is sent exactly once).

Replicas: `env.url` may name several env services. Sessions are spread over them (the
replica holding the fewest gets the next one), each replica's share of a batched step goes
in one request, the requests in parallel. A replica that fails its share (unreachable, timed
out, an error) ends those episodes as the env's failure, never the agent's (`info.env_error`,
terminated, no reward), and new sessions replace them on the replicas that answer.

Seeds are deterministic: the trainer passes them, so an update's episodes are the same
whether the run was resumed or not.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shared.client import ServiceError
from shared.config import url_list
from shared.env_client import EnvClient
from shared.schemas import BatchStepResult, Observation

log = logging.getLogger(__name__)


@dataclass
class EnvResult:
    observation: Observation
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Session:
    replica: int
    session_id: str


class EnvPool:
    def __init__(self, url: str | list[str], env_id: str, num_envs: int, options: dict[str, Any] | None = None,
                 timeout_s: float = 60.0, retries: int = 4, clients: list[EnvClient] | None = None):
        self.clients = clients or [EnvClient(u, timeout=timeout_s, retries=retries) for u in url_list(url)]
        self.env_id, self.num_envs, self.options = env_id, num_envs, dict(options or {})
        self.sessions: list[_Session] = []
        self.down: set[int] = set()
        """Replicas that failed to answer; tried again only when no other one answers."""
        self._executor = ThreadPoolExecutor(len(self.clients)) if len(self.clients) > 1 else None

    @property
    def session_ids(self) -> list[str]:
        return [s.session_id for s in self.sessions]

    def open(self, seeds: list[int]) -> list[EnvResult]:
        """Create the sessions (first call) or reset them, with one seed each."""
        if not self.sessions:
            out = []
            for seed in seeds:
                session, r = self._create(seed)
                self.sessions.append(session)
                out.append(EnvResult(r.observation, info=r.info))
            return out
        return [self.reset(i, s) for i, s in enumerate(seeds)]

    def reset(self, i: int, seed: int) -> EnvResult:
        """Reset session i. A reset that fails (its reply lost, its replica down, the session
        failed) is not sent again: a new session with the same seed starts the same episode."""
        s = self.sessions[i]
        try:
            r = self.clients[s.replica].reset(s.session_id, seed=seed)
        except ServiceError as e:
            log.warning("env reset of session %s on %s failed (%s); starting the episode in a new session",
                        s.session_id, self.clients[s.replica].base_url, e)
            self._note_failure(s.replica, e)
            self.sessions[i], r = self._create(seed)
        return EnvResult(r.observation, info=r.info)

    def step(self, actions: list[str], which: list[int] | None = None) -> list[EnvResult]:
        """Step sessions `which` (default all) with the model's raw outputs: one request per replica."""
        which = list(range(self.num_envs)) if which is None else which
        by_replica: dict[int, list[tuple[int, str]]] = {}
        for i, a in zip(which, actions, strict=True):
            by_replica.setdefault(self.sessions[i].replica, []).append((i, a))
        calls = {rep: [(self.sessions[i].session_id, a) for i, a in items] for rep, items in by_replica.items()}
        if self._executor is None or len(calls) == 1:
            replies = {rep: self._step_replica(rep, steps) for rep, steps in calls.items()}
        else:
            futures = {rep: self._executor.submit(self._step_replica, rep, steps) for rep, steps in calls.items()}
            replies = {rep: f.result() for rep, f in futures.items()}
        results: dict[int, EnvResult] = {}
        for rep, items in by_replica.items():
            reply = replies[rep]
            for k, (i, _a) in enumerate(items):
                if isinstance(reply, ServiceError):
                    results[i] = self._replace_failed(i, f"env replica {self.clients[rep].base_url}: {reply}")
                    continue
                r: BatchStepResult = reply[k]
                if r.error is not None or r.observation is None:
                    results[i] = self._replace_failed(i, r.error.detail if r.error else "no observation")
                else:
                    results[i] = EnvResult(r.observation, r.reward, r.terminated, r.truncated, r.info)
        return [results[i] for i in which]

    def _step_replica(self, rep: int, steps: list[tuple[str, str]]) -> list[BatchStepResult] | ServiceError:
        try:
            return self.clients[rep].step_batch(steps)
        except ServiceError as e:
            # Sent once: whether the steps were applied is unknown, so these episodes end here.
            log.warning("batched step of %d session(s) failed: %s", len(steps), e)
            self._note_failure(rep, e)
            return e

    def _replace_failed(self, i: int, detail: str) -> EnvResult:
        """An exception inside one env fails that session alone (DESIGN §3.1): open a new one in
        its place and end the episode there (terminated, no bootstrap, no reward, no format term)."""
        log.warning("env session %s failed (%s); replacing it", self.sessions[i].session_id, detail)
        self.sessions[i], new = self._create(None)
        return EnvResult(new.observation, 0.0, True, False, {"env_error": detail, "won": False})

    def _note_failure(self, rep: int, e: ServiceError) -> None:
        if len(self.clients) > 1 and (e.status is None or e.status >= 500):
            log.warning("env replica %s marked down: %s", self.clients[rep].base_url, e)
            self.down.add(rep)

    def _create(self, seed: int | None):
        """A new session on the replica that holds the fewest (answering replicas first). Each
        replica but the last candidate is tried once, so a dead one costs no backoff."""
        load = [0] * len(self.clients)
        for s in self.sessions:
            load[s.replica] += 1
        order = sorted(range(len(self.clients)), key=lambda k: (k in self.down, load[k], k))
        last: ServiceError | None = None
        for n, rep in enumerate(order):
            try:
                r = self.clients[rep].create(self.env_id, seed=seed, options=self.options,
                                             retries=None if n == len(order) - 1 else 0)
            except ServiceError as e:
                if e.status is not None and e.status < 500:
                    raise  # the request itself is wrong (unknown env, bad options): no replica will take it
                last = e
                self._note_failure(rep, e)
                continue
            self.down.discard(rep)
            return _Session(rep, r.session_id), r
        assert last is not None
        raise last

    def close(self) -> None:
        for s in self.sessions:
            try:
                self.clients[s.replica].delete(s.session_id)
            except ServiceError as e:  # sessions also expire by TTL; closing is best effort
                log.debug("closing env session %s: %s", s.session_id, e)
        self.sessions = []
        for c in self.clients:
            c.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
