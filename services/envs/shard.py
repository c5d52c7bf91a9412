"""A shard: some of the service's sessions and the wire encoding of their results, behind one
typed async API (`Shard`), in two kinds:

- `WorkerShard`: the sessions live in a spawned worker process (`transport.WorkerPipe`), so env
  steps use more than one core (Python envs are GIL-bound) and a crash or hang stays there;
- `LocalShard`: the sessions live in the service process (`procs: 0`), called in a thread pool.

Both call the same `ShardCore` methods, where the sessions live: a `SessionTable` (plain objects)
plus `wire`, so a worker sends finished JSON bytes and the service splices them into its reply.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from services.envs import wire
from services.envs.base import TextActionEnv
from services.envs.registry import Registry
from services.envs.sessions import SessionFailed, SessionTable
from services.envs.transport import WorkerGone, WorkerPipe, serve_requests

log = logging.getLogger(__name__)

BatchPart = list[tuple[int, str, str]]
"""Steps of a batch for one shard: (index in the request, session id, action)."""
BatchAnswers = list[tuple[int, "bytes | Exception"]]
"""Per step of a part: its index and a `BatchStepResult` as JSON, or the step's exception."""
Events = tuple[dict[str, list[float]], list[str]]
"""(step seconds by env id, env ids of sessions that failed) since the last reply: for /metrics."""


class ShardCore:
    """Where a shard's sessions live (a worker process, or the service process). Plain calls that
    answer JSON bytes or raise the core's typed errors."""

    def __init__(self, registry: Registry, threads: int):
        self._lock = threading.Lock()
        self._steps: dict[str, list[float]] = {}
        self._failures: list[str] = []
        self.table = SessionTable(registry, threads, on_step=self._on_step, on_failure=self._on_failure)

    # -- the API the service calls ------------------------------------------------------------------
    def create(self, sid: str, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes:
        return wire.session_json(sid, *self.table.create(sid, env_id, seed, options))

    def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes:
        return wire.reset_json(*self.table.reset(sid, seed, options))

    def step(self, sid: str, action: str) -> bytes:
        return wire.step_json(self.table.step(sid, action).result)

    def step_batch(self, part: BatchPart, auto_reset: bool) -> BatchAnswers:
        sid_of = {idx: sid for idx, sid, _ in part}
        return [(idx, out if isinstance(out, Exception) else wire.batch_item_json(sid_of[idx], out.result, out.reset))
                for idx, out in self.table.step_batch(part, auto_reset)]

    def delete(self, sid: str) -> None:
        self.table.delete(sid)

    def probe(self) -> None:
        """Deal and step a Points24 episode (exercises the env code path)."""
        registry = self.table.registry
        if "points24" in registry.envs:
            env = registry.make("points24")
            env.reset(seed=0)
            env.step('{"thoughts": "probe", "action": "="}')

    # -- what the worker loop needs (`transport.Served`) ----------------------------------------------
    def inline(self, method: Callable, args: tuple) -> bool:
        """Cheap enough for the worker's main thread (no thread hop): everything but what touches
        a slow env (ALFWorld: a step ~20 ms, a reset may load a game)."""
        if method is ShardCore.create:
            return getattr(self.table.registry.envs.get(args[1]), "fast", True)
        if method in (ShardCore.reset, ShardCore.step, ShardCore.delete):
            return self.table.is_fast(args[0])
        if method is ShardCore.step_batch:
            return all(self.table.is_fast(sid) for _, sid, _ in args[0])
        return True

    def idle(self) -> bool:
        return self.table.prefetch_one()

    def _on_step(self, env_id: str, seconds: float) -> None:
        with self._lock:
            self._steps.setdefault(env_id, []).append(seconds)

    def _on_failure(self, env_id: str) -> None:
        with self._lock:
            self._failures.append(env_id)

    def drain_events(self) -> Events | None:
        with self._lock:
            if not self._steps and not self._failures:
                return None
            events = (self._steps, self._failures)
            self._steps, self._failures = {}, []
            return events

    def close(self) -> None:
        self.table.shutdown()


class Shard(Protocol):
    """The router's view of a shard. Failures of the shard itself (its worker died or hung) raise
    `SessionFailed`; a session's own errors pass through typed."""

    name: str
    sessions: int
    """Sessions placed here (kept by the router, for placing new ones)."""

    @property
    def dead(self) -> str | None:
        """Why the shard cannot serve any more, or None."""

    @property
    def ready(self) -> bool:
        """Started and not dead."""

    async def start(self) -> None: ...
    async def create(self, sid: str, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes: ...
    async def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes: ...
    async def step(self, sid: str, action: str) -> bytes: ...
    async def step_batch(self, part: BatchPart, auto_reset: bool) -> BatchAnswers: ...
    async def delete(self, sid: str) -> None: ...
    async def probe(self) -> None: ...
    async def close(self) -> None: ...


class LocalShard:
    """The sessions in the service process (`procs: 0`): each call in a thread pool. No deadline:
    a thread cannot be killed (use worker processes for hang isolation)."""

    def __init__(self, registry: Registry, threads: int, on_events: Callable[[Events], None]):
        self.name = "the service process"
        self.sessions = 0
        self.dead: str | None = None
        self.ready = True
        self.core = ShardCore(registry, threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env-request")
        self._on_events = on_events

    async def _call(self, method: Callable, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(method, self.core, *args))
        finally:
            events = self.core.drain_events()
            if events:
                self._on_events(events)

    async def start(self) -> None:
        pass

    async def create(self, sid: str, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes:
        return await self._call(ShardCore.create, sid, env_id, seed, options)

    async def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes:
        return await self._call(ShardCore.reset, sid, seed, options)

    async def step(self, sid: str, action: str) -> bytes:
        return await self._call(ShardCore.step, sid, action)

    async def step_batch(self, part: BatchPart, auto_reset: bool) -> BatchAnswers:
        return await self._call(ShardCore.step_batch, part, auto_reset)

    async def delete(self, sid: str) -> None:
        await self._call(ShardCore.delete, sid)

    async def probe(self) -> None:
        await self._call(ShardCore.probe)

    async def close(self) -> None:
        self.core.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _worker_main(rx, tx, envs: dict[str, type[TextActionEnv]], server_config: dict, threads: int,
                 log_level: int) -> None:
    """Entry point of an env worker process."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s env-worker[{os.getpid()}] %(name)s: %(message)s")
    serve_requests(rx, tx, ShardCore(Registry(envs, server_config), threads), threads)


class WorkerShard:
    """The sessions in a spawned worker process. A call past `call_timeout_s` kills the worker;
    then (as after a crash) this shard's calls raise `SessionFailed` saying why."""

    def __init__(self, index: int, registry: Registry, threads: int, call_timeout_s: float,
                 on_events: Callable[[Events], None], on_death: Callable[["WorkerShard"], None]):
        self.name = f"env worker process {index}"
        self.sessions = 0
        self.pipe = WorkerPipe(self.name, _worker_main,
                               (registry.envs, registry.server_config, threads, logging.getLogger().level),
                               call_timeout_s, on_events, lambda pipe: on_death(self))

    @property
    def dead(self) -> str | None:
        return self.pipe.dead

    @property
    def ready(self) -> bool:
        return self.pipe.started_ok and not self.pipe.dead

    @property
    def pid(self) -> int | None:
        return self.pipe.process.pid

    async def _call(self, method: Callable, *args: Any) -> Any:
        try:
            return await self.pipe.call(method, *args)
        except WorkerGone as e:
            raise SessionFailed(f"{e}; delete the session and create a new one") from None

    async def start(self) -> None:
        try:
            await self.pipe.started()
        except WorkerGone as e:
            raise RuntimeError(str(e)) from None

    async def create(self, sid: str, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes:
        return await self._call(ShardCore.create, sid, env_id, seed, options)

    async def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes:
        return await self._call(ShardCore.reset, sid, seed, options)

    async def step(self, sid: str, action: str) -> bytes:
        return await self._call(ShardCore.step, sid, action)

    async def step_batch(self, part: BatchPart, auto_reset: bool) -> BatchAnswers:
        return await self._call(ShardCore.step_batch, part, auto_reset)

    async def delete(self, sid: str) -> None:
        await self._call(ShardCore.delete, sid)

    async def probe(self) -> None:
        await self._call(ShardCore.probe)

    async def close(self) -> None:
        await self.pipe.close()
