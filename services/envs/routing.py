"""Session routing: which shard holds each session, and the service's limits, all in one place:
the maximum of open sessions, the idle TTL, the steps per batch, and batches served in parts.

    app.py (HTTP)  ->  SessionRouter  ->  Shard (shard.py): WorkerShard | LocalShard
                       sid -> shard, limits, TTL       ShardCore -> SessionTable -> envs

Everything here runs on the service's event loop (no locks). A shard whose worker died or hung
fails its own sessions (409) and is replaced for new ones; the other shards carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
import uuid
from collections import Counter
from typing import Any, Callable

from services.envs.registry import Registry
from services.envs.sessions import BatchTooLarge, SessionFailed, TooManySessions, UnknownSession
from services.envs.shard import BatchPart, Events, LocalShard, Shard, WorkerShard

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """A shard did not answer its probe in time (/readyz answers 503)."""


class SessionRouter:
    def __init__(self, registry: Registry, *, max_sessions: int = 256, ttl_s: float = 1800.0, procs: int = 2,
                 threads: int = 4, call_timeout_s: float = 60.0, max_batch_steps: int = 1024,
                 batch_part_steps: int = 64, on_steps: Callable[[str, list[float]], None] | None = None,
                 on_failure: Callable[[str], None] | None = None, on_worker_death: Callable[[], None] | None = None):
        """`on_steps(env_id, seconds)` gets the durations of steps taken (in bunches, as replies
        come); `on_failure(env_id)` is called for each session that fails, `on_worker_death()`
        for each worker process that dies or is killed."""
        self.registry = registry
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.procs = procs
        self.threads = threads
        self.call_timeout_s = call_timeout_s
        self.max_batch_steps = max_batch_steps
        self.batch_part_steps = batch_part_steps
        self._on_steps = on_steps or (lambda env_id, seconds: None)
        self._on_failure = on_failure or (lambda env_id: None)
        self._on_worker_death = on_worker_death or (lambda: None)
        self.shards: list[Shard] = []
        self._where: dict[str, Shard | None] = {}  # session -> shard (None while its create runs)
        self._env_of: dict[str, str] = {}
        self._last_used: dict[str, float] = {}
        self._busy: Counter[str] = Counter()  # calls in flight per session (never expired while busy)

    # -- shards ------------------------------------------------------------------------------------
    def _spawn(self, index: int) -> WorkerShard:
        return WorkerShard(index, self.registry, self.threads, self.call_timeout_s, self._apply_events,
                           self._shard_died)

    async def start(self) -> None:
        if self.procs == 0:
            self.shards = [LocalShard(self.registry, self.threads, self._apply_events)]
            return
        try:  # the worker processes get the env classes by name
            pickle.dumps(self.registry.envs)
        except Exception as e:  # noqa: BLE001 - say what to do instead of a traceback from a child
            raise RuntimeError(f"env worker processes need env classes importable by name (defined at module "
                               f"level): {e}; define them so, or serve with procs 0 (--procs 0)") from e
        self.shards = [self._spawn(i) for i in range(self.procs)]
        await asyncio.gather(*(s.start() for s in self.shards))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)

    def _apply_events(self, events: Events) -> None:
        steps, failures = events
        for env_id, seconds in steps.items():
            self._on_steps(env_id, seconds)
        for env_id in failures:
            self._on_failure(env_id)

    def _shard_died(self, shard: Shard) -> None:
        """Each session the dead (or killed) worker held counts as a failed session."""
        log.error("%s; its %d session(s) fail, a new worker takes new sessions", shard.dead, shard.sessions)
        self._on_worker_death()
        for sid, where in list(self._where.items()):
            if where is shard:
                self._on_failure(self._env_of.get(sid, "unknown"))

    def _replace_dead(self) -> None:
        for i, s in enumerate(self.shards):
            if s.dead:
                self.shards[i] = self._spawn(i)

    def _live_shard(self) -> Shard:
        """The shard for a new session: the one holding the fewest (a dead worker is replaced first)."""
        self._replace_dead()
        return min(self.shards, key=lambda s: s.sessions)

    # -- sessions ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._where)

    def _shard_of(self, sid: str) -> Shard:
        shard = self._where.get(sid)
        if shard is None:
            raise UnknownSession(f"unknown session {sid!r} (deleted, expired after {self.ttl_s:.0f}s idle, "
                                 "or never created)")
        return shard

    @contextlib.contextmanager
    def _using(self, *sids: str):
        """The TTL counts from a session's last call: mark the sessions busy while it runs."""
        for sid in sids:
            self._busy[sid] += 1
            self._last_used[sid] = time.monotonic()
        try:
            yield
        finally:
            now = time.monotonic()
            for sid in sids:
                self._busy[sid] -= 1
                if self._busy[sid] <= 0:
                    del self._busy[sid]
                if sid in self._last_used:
                    self._last_used[sid] = now

    async def create(self, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes:
        if len(self._where) >= self.max_sessions:
            await self.reap()
        if len(self._where) >= self.max_sessions:
            raise TooManySessions(f"{self.max_sessions} sessions are open (the maximum); delete some or wait "
                                  f"for idle ones to expire after {self.ttl_s:.0f}s")
        shard = self._live_shard()
        await shard.start()
        sid = uuid.uuid4().hex
        self._where[sid] = None  # the slot is taken while the env is built
        self._last_used[sid] = time.monotonic()
        shard.sessions += 1
        try:
            with self._using(sid):
                out = await shard.create(sid, env_id, seed, options)
        except BaseException:
            self._forget(sid, shard)
            raise
        self._where[sid] = shard
        self._env_of[sid] = env_id
        return out

    def _forget(self, sid: str, shard: Shard) -> None:
        self._where.pop(sid, None)
        self._env_of.pop(sid, None)
        self._last_used.pop(sid, None)
        shard.sessions -= 1

    async def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes:
        shard = self._shard_of(sid)
        with self._using(sid):
            return await shard.reset(sid, seed, options)

    async def step(self, sid: str, action: str) -> bytes:
        shard = self._shard_of(sid)
        with self._using(sid):
            return await shard.step(sid, action)

    async def step_batch(self, steps: list[tuple[str, str]], auto_reset: bool = False) -> list[bytes | Exception]:
        """One answer per step, in order: a `BatchStepResult` as JSON, or the step's exception.
        The shards step their parts at once; each shard's part goes in pieces of
        `batch_part_steps`, one after the other, so that other sessions' calls waiting for that
        worker are served between the pieces (a big batch does not starve them)."""
        if len(steps) > self.max_batch_steps:
            raise BatchTooLarge(f"{len(steps)} steps in one batch; the limit is {self.max_batch_steps} "
                                "(the server's --max-batch-steps): split the batch")
        results: list[bytes | Exception | None] = [None] * len(steps)
        parts: dict[int, tuple[Shard, BatchPart]] = {}
        for idx, (sid, action) in enumerate(steps):
            try:
                shard = self._shard_of(sid)
            except UnknownSession as e:
                results[idx] = e
                continue
            parts.setdefault(id(shard), (shard, []))[1].append((idx, sid, action))

        async def run(shard: Shard, part: BatchPart) -> list[tuple[int, bytes | Exception]]:
            out: list[tuple[int, bytes | Exception]] = []
            for start in range(0, len(part), self.batch_part_steps):
                piece = part[start:start + self.batch_part_steps]
                try:
                    out.extend(await shard.step_batch(piece, auto_reset))
                except Exception as e:  # noqa: BLE001 - the shard failed as a whole: each of its steps says so
                    out.extend((idx, e) for idx, _, _ in piece)
            return out

        with self._using(*{sid for sid, _ in steps if sid in self._where}):
            for answers in await asyncio.gather(*(run(shard, part) for shard, part in parts.values())):
                for idx, res in answers:
                    results[idx] = res
        return results  # type: ignore[return-value]  # every index is filled

    async def delete(self, sid: str) -> None:
        shard = self._shard_of(sid)
        try:
            if not shard.dead:
                await shard.delete(sid)
        except (UnknownSession, SessionFailed):
            pass  # gone in the shard already (its worker died meanwhile): gone either way
        finally:
            self._forget(sid, shard)

    async def reap(self) -> int:
        """Close the sessions no call touched for `ttl_s` (never one with a call in flight); how many."""
        now = time.monotonic()
        expired = [sid for sid, shard in self._where.items()
                   if shard is not None and not self._busy[sid] and now - self._last_used.get(sid, now) > self.ttl_s]
        for sid in expired:
            if sid in self._where:  # (a delete may have run meanwhile)
                await self.delete(sid)
        if expired:
            log.info("expired %d idle session(s)", len(expired))
        return len(expired)

    async def probe(self, timeout: float | None = None) -> None:
        """Every running shard answers and can play a Points24 step within `timeout` (default:
        the call deadline, at most 10 s). Dead shards are skipped (replaced at the next create),
        as are replacements still starting, unless no shard runs at all. A shard that does not
        answer in time is not waited for longer (/readyz must not hang); its call goes on, under
        its own deadline."""
        live = [s for s in self.shards if s.ready]
        if not live:  # nothing to probe yet: start (or replace) the workers and wait for them
            self._replace_dead()
            await asyncio.gather(*(s.start() for s in self.shards))
            live = self.shards
        timeout = timeout if timeout is not None else min(self.call_timeout_s, 10.0)
        tasks = {asyncio.ensure_future(s.probe()): s for s in live}
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning later
        for task in done:
            task.result()
        if pending:
            raise NotReady(", ".join(tasks[t].name for t in pending) + f" did not answer within {timeout:g}s")
