"""Sessions sharded over env worker processes, so that env steps use more than one core.

A thread pool in one process is GIL-bound: Python envs (the card games, ALFWorld's engine) never
step in parallel there. Here the service process keeps only HTTP and a table of which shard holds
which session; each shard is a `Shard` (a `SessionManager` and its envs) living in a worker
process (`ProcessShard`), or in the service process itself when `procs` is 0 (`LocalShard`).

    service process (FastAPI)            worker process k (spawned)
    Sessions: sid -> shard    --pipe-->  Shard -> SessionManager -> envs
              answers 4xx     <--pipe--  replies: JSON bytes, errors by name, metric events

A batched step is split by shard and the shards step at once; the replies are JSON bytes made in
the workers and spliced by the service (nothing is decoded and re-encoded in between). A worker
that dies (a segfault in an env's native code, the OOM killer) fails the sessions it held, with a
409 that says so, and is replaced for new sessions; the other shards carry on.

The pipes carry pickles between this service and the processes it spawned, never data from the
network: requests are built here from validated HTTP bodies.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import termios
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import pydantic_core

from services.envs.base import EnvOptionError, EnvUnavailable, EpisodeOver, TextActionEnv
from services.envs.registry import Registry, UnknownEnv
from services.envs.sessions import SessionFailed, SessionManager, TooManySessions, UnknownSession

log = logging.getLogger(__name__)

# Errors that cross the pipe by name (the app maps each to its 4xx); anything else is a bug (500).
_ERRORS: dict[str, type[Exception]] = {c.__name__: c for c in (
    UnknownSession, SessionFailed, TooManySessions, EnvOptionError, EpisodeOver, EnvUnavailable, UnknownEnv)}
_PIPE_BYTES = 1 << 20  # a 32-step reply is ~240 KB: one write instead of four 64 KB round trips


def _error_from(name: str, message: str) -> Exception:
    cls = _ERRORS.get(name)
    return cls(message) if cls is not None else RuntimeError(f"{name}: {message}")


def _error_to(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, (e.args[0] if isinstance(e, KeyError) and e.args else str(e))


def _json(data: Any) -> bytes:
    return pydantic_core.to_json(data)


class Shard:
    """Sessions in one process, as operations that answer JSON bytes (or raise), so that a worker
    sends what it made as is and the service splices it into its reply. Plain calls: a worker
    makes the cheap ones in its main thread and the others in its pool (`inline`)."""

    OPS = ("create", "reset", "step", "step_batch", "delete", "reap", "probe")

    def __init__(self, registry: Registry, ttl_s: float, threads: int,
                 on_step: Callable[[str, float], None] | None = None, on_failure: Callable[[str], None] | None = None):
        # The service counts sessions across shards; a shard holds what the service gives it.
        self.manager = SessionManager(registry, sys.maxsize, ttl_s, threads, on_step=on_step, on_failure=on_failure)

    def inline(self, op: str, args: tuple) -> bool:
        """Cheap enough to make in the worker's main thread (no thread hop): everything but what
        touches a slow env (ALFWorld: a step ~20 ms, a reset may load a game)."""
        m = self.manager
        if op == "create":
            return getattr(m.registry.envs.get(args[1]), "fast", True)
        if op in ("reset", "step", "delete"):
            return m.is_fast(args[0])
        if op == "step_batch":
            return all(m.is_fast(sid) for _, sid, _ in args[0])
        return True

    def handle(self, op: str, args: tuple) -> Any:
        if op not in self.OPS:
            raise ValueError(f"unknown shard operation {op!r}")
        return getattr(self, op)(*args)

    def create(self, sid: str, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes:
        sid, obs, info = self.manager.create(env_id, seed, options, sid)
        return _json({"session_id": sid, "observation": obs, "info": info})

    def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes:
        obs, info = self.manager.reset(sid, seed, options)
        return _json({"observation": obs, "info": info})

    def step(self, sid: str, action: str) -> bytes:
        return _json(self.manager.step(sid, action))

    def step_batch(self, items: list[tuple[int, str, str]], auto_reset: bool) -> list[tuple[int, bytes | Exception]]:
        """`items` are (index in the request, session, action); each answer is one element of
        the batch reply (a `BatchStepResult`) as JSON, or the exception of that step."""
        results = self.manager.step_batch([(sid, action) for _, sid, action in items], auto_reset)
        return [(idx, res if isinstance(res, Exception) else _json({"session_id": sid, **res, "error": None}))
                for (idx, sid, _), res in zip(items, results, strict=True)]

    def delete(self, sid: str) -> None:
        self.manager.delete(sid)

    def reap(self) -> list[str]:
        return self.manager.reap()

    def prefetch_one(self) -> bool:
        return self.manager.prefetch_one()

    def probe(self) -> None:
        """Deal and step a Points24 episode (exercises the env code path)."""
        registry = self.manager.registry
        if "points24" in registry.envs:
            env = registry.make("points24")
            env.reset(seed=0)
            env.step('{"thoughts": "probe", "action": "="}')

    def close(self) -> None:
        self.manager.shutdown()


class LocalShard:
    """A `Shard` in the service process (`procs: 0`): every operation in its thread pool."""

    def __init__(self, registry: Registry, ttl_s: float, threads: int,
                 on_step: Callable[[str, float], None] | None = None, on_failure: Callable[[str], None] | None = None):
        self.shard = Shard(registry, ttl_s, threads, on_step, on_failure)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env-request")
        self.dead: str | None = None
        self.died_at = 0.0

    def __len__(self) -> int:
        return len(self.shard.manager)

    async def call(self, op: str, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.shard.handle, op, args)

    async def close(self) -> None:
        self.shard.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- worker process -----------------------------------------------------------------------------------

def _worker_main(rx, tx, envs: dict[str, type[TextActionEnv]], defaults: dict, ttl_s: float, threads: int,
                 log_level: int) -> None:
    """Entry point of a worker process: serve the service's requests until it says stop or goes
    away. Cheap requests run right here, one after another (no thread hop); slow ones in a pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle; it stops us
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s env-worker[{os.getpid()}] %(name)s: %(message)s")
    steps: dict[str, list[float]] = {}  # step seconds by env, sent with the next reply (for /metrics)
    failures: list[str] = []
    lock = threading.Lock()  # guards the events and the reply pipe

    def on_step(env_id: str, seconds: float) -> None:
        with lock:
            steps.setdefault(env_id, []).append(seconds)

    def on_failure(env_id: str) -> None:
        with lock:
            failures.append(env_id)

    shard = Shard(Registry(envs, defaults), ttl_s, threads, on_step, on_failure)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env-request")

    def serve(req_id: int, op: str, args: tuple) -> None:
        try:
            result = shard.handle(op, args)
            if op == "step_batch":
                result = [(i, _error_to(r) if isinstance(r, Exception) else r) for i, r in result]
            ok = True
        except Exception as e:  # noqa: BLE001 - every error goes back to the service, which maps it
            ok, result = False, _error_to(e)
        with lock:
            events = (dict(steps), failures[:]) if steps or failures else None
            steps.clear()
            failures.clear()
            tx.send((req_id, ok, result, events))

    with lock:
        tx.send(("hello", os.getpid()))
    try:
        while True:
            # Idle between requests (the trainer is computing its next actions): prepare the
            # sessions' next resets, one at a time, until a request arrives.
            while not rx.poll(0) and shard.prefetch_one():
                pass
            try:
                msg = rx.recv()
            except (EOFError, OSError):  # the service went away
                break
            if msg is None:
                break
            req_id, op, args = msg
            if shard.inline(op, args):
                serve(req_id, op, args)
            else:
                pool.submit(serve, req_id, op, args)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        shard.close()


def _grow_pipe(conn) -> int:
    """Make a pipe hold 1 MB (Linux; elsewhere it keeps its size); its size in bytes."""
    try:
        fcntl.fcntl(conn.fileno(), 1031, _PIPE_BYTES)  # F_SETPIPE_SZ
        return fcntl.fcntl(conn.fileno(), 1032)  # F_GETPIPE_SZ
    except (OSError, AttributeError):
        return 0  # unknown: every request goes through the writer thread


def _unread(fd: int) -> int:
    """Bytes written into a pipe and not read yet."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return _PIPE_BYTES


class ProcessShard:
    """A `Shard` in a spawned worker process, called over two pipes. Requests are sent from the
    service's event loop, and replies read there too (`add_reader`: no reader thread to hop through)."""

    _ids = itertools.count()

    def __init__(self, index: int, envs: dict[str, type[TextActionEnv]], defaults: dict, ttl_s: float, threads: int,
                 on_events: Callable[[tuple], None], on_death: Callable[["ProcessShard"], None]):
        ctx = mp.get_context("spawn")  # never fork a process that runs threads and an event loop
        self.index = index
        req_rx, self._tx = ctx.Pipe(duplex=False)
        self._rx, rep_tx = ctx.Pipe(duplex=False)
        _grow_pipe(rep_tx)
        self._tx_size = _grow_pipe(self._tx)
        self._backlog: collections.deque[bytes] = collections.deque()
        self._writer_busy = False
        self._send_lock = threading.Lock()
        self.process = ctx.Process(target=_worker_main, name=f"env-worker-{index}", daemon=True,
                                   args=(req_rx, rep_tx, envs, defaults, ttl_s, threads, logging.getLogger().level))
        self.process.start()
        req_rx.close()
        rep_tx.close()
        self.dead: str | None = None
        self.died_at = 0.0
        self._closing = False
        self.sessions = 0  # held here, counted by the service (for placing new sessions)
        self._pending: dict[int, asyncio.Future] = {}
        self._on_events = on_events
        self._on_death = on_death
        self._loop = asyncio.get_running_loop()  # built on the service's loop, and read there
        self._ready = asyncio.Event()
        self._loop.add_reader(self._rx.fileno(), self._read)
        # uvloop (libuv) makes a watched fd non-blocking; `recv` must read a whole message once
        # its first bytes are there (the worker is writing the rest), so block.
        os.set_blocking(self._rx.fileno(), True)

    def __len__(self) -> int:
        return self.sessions

    async def ready(self, timeout: float = 120.0) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            self.dead = self.dead or f"env worker process {self.index} did not start within {timeout:.0f}s"
        if self.dead:
            raise RuntimeError(self.dead)

    def _read(self) -> None:
        """A reply is readable (the worker writes each in one go into a 1 MB pipe), or the worker is gone."""
        try:
            msg = self._rx.recv()
        except (EOFError, OSError):
            self._gone()
            return
        if msg[0] == "hello":
            self._ready.set()
            return
        req_id, ok, payload, events = msg
        if events:
            self._on_events(events)
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(payload)
        else:
            fut.set_exception(_error_from(*payload))

    def _gone(self) -> None:
        self._loop.remove_reader(self._rx.fileno())
        self.process.join(1)
        self.dead = f"env worker process {self.index} (pid {self.process.pid}) exited with code {self.process.exitcode}"
        self.died_at = time.monotonic()
        self._ready.set()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(SessionFailed(f"{self.dead}; delete the session and create a new one"))
        if not self._closing:
            log.error("%s; its %d session(s) fail, a new worker takes new sessions", self.dead, self.sessions)
            self._on_death(self)

    async def call(self, op: str, *args: Any) -> Any:
        if self.dead:
            raise SessionFailed(f"{self.dead}; delete the session and create a new one")
        req_id = next(self._ids)
        fut = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            self._send(ForkingPickler.dumps((req_id, op, args)))
        except (OSError, ValueError) as e:
            self._pending.pop(req_id, None)
            raise SessionFailed(f"env worker process {self.index} is gone ({e}); delete the session and create a new one") from e
        return await fut

    def _send(self, buf: bytes) -> None:
        """Write a request without ever blocking the event loop: straight into the pipe when it
        surely has room, else through a writer thread. (Were the loop blocked on a full request
        pipe, it would stop reading replies; a worker blocked on a full reply pipe stops reading
        requests: both would wait forever.)"""
        with self._send_lock:
            # Room counted in whole pages, as the kernel fills them, with two to spare.
            room = self._tx_size - (_unread(self._tx.fileno()) // 4096 + 2) * 4096
            if not self._writer_busy and room >= len(buf) + 16:
                self._tx.send_bytes(buf)
                return
            self._backlog.append(buf)
            if not self._writer_busy:
                self._writer_busy = True
                threading.Thread(target=self._drain, name=f"env-worker-{self.index}-writer", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._send_lock:
                if not self._backlog:
                    self._writer_busy = False
                    return
                buf = self._backlog.popleft()
            try:
                self._tx.send_bytes(buf)  # may wait for the worker; the loop keeps reading replies
            except (OSError, ValueError):  # the worker is gone: its reader fails what is pending
                with self._send_lock:
                    self._backlog.clear()
                    self._writer_busy = False
                return

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        if self.dead is None:
            try:
                self._send(ForkingPickler.dumps(None))  # the worker closes its sessions and exits
            except (OSError, ValueError):
                pass
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, timeout)
        if self.process.is_alive():
            log.warning("env worker process %d did not stop in %.0fs; terminating it", self.index, timeout)
            self.process.terminate()
            await asyncio.get_running_loop().run_in_executor(None, self.process.join, 5)
        if self.dead is None:
            self._loop.remove_reader(self._rx.fileno())
            self.dead = f"env worker process {self.index} was stopped"
        self._tx.close()
        self._rx.close()


AnyShard = LocalShard | ProcessShard


class Sessions:
    """The service's view: which shard holds each session, the session limit, the TTL sweep, and
    batches split across shards. All methods run on the service's event loop (no locks needed)."""

    def __init__(self, registry: Registry, max_sessions: int = 256, ttl_s: float = 1800.0, procs: int = 2,
                 threads: int = 4, on_steps: Callable[[str, list[float]], None] | None = None,
                 on_failure: Callable[[str], None] | None = None, on_worker_death: Callable[[], None] | None = None):
        """`on_steps(env_id, seconds)` gets the durations of steps taken (in bunches, as replies
        come); `on_failure(env_id)` is called for each session that fails, `on_worker_death()`
        for each worker process that dies."""
        self.registry = registry
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.procs = procs
        self.threads = threads
        self._on_steps = on_steps or (lambda env_id, seconds: None)
        self._on_failure = on_failure or (lambda env_id: None)
        self._on_worker_death = on_worker_death or (lambda: None)
        self.shards: list[AnyShard] = []
        self._where: dict[str, AnyShard] = {}  # session -> shard (None while its create runs)
        self._env_of: dict[str, str] = {}

    # -- lifecycle of the shards ---------------------------------------------------------------------
    def _spawn(self, index: int) -> ProcessShard:
        return ProcessShard(index, self.registry.envs, self.registry.server_config, self.ttl_s, self.threads,
                            self._apply_events, self._shard_died)

    async def start(self) -> None:
        if self.procs:
            try:  # the worker processes get the env classes by name
                pickle.dumps(self.registry.envs)
            except Exception as e:  # noqa: BLE001 - say what to do instead of a traceback from a child
                raise RuntimeError(f"env worker processes need env classes importable by name (defined at module "
                                   f"level): {e}; define them so, or serve with procs 0 (--procs 0)") from e
        if self.procs == 0:
            self.shards = [LocalShard(self.registry, self.ttl_s, self.threads,
                                      lambda env_id, seconds: self._on_steps(env_id, [seconds]), self._on_failure)]
            return
        self.shards = [self._spawn(i) for i in range(self.procs)]
        await asyncio.gather(*(s.ready() for s in self.shards))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)

    def _apply_events(self, events: tuple) -> None:
        steps, failures = events
        for env_id, seconds in steps.items():
            self._on_steps(env_id, seconds)
        for env_id in failures:
            self._on_failure(env_id)

    def _shard_died(self, shard: ProcessShard) -> None:
        """Each session the dead worker held counts as a failed session (on the event loop)."""
        self._on_worker_death()
        for sid, where in list(self._where.items()):
            if where is shard:
                self._on_failure(self._env_of.get(sid, "unknown"))

    def _live_shard(self) -> AnyShard:
        """The shard for a new session: the one holding the fewest (a dead worker is replaced first)."""
        for i, s in enumerate(self.shards):
            if s.dead:
                self.shards[i] = self._spawn(i)
        return min(self.shards, key=len)

    # -- sessions -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._where)

    def _shard_of(self, sid: str) -> AnyShard:
        shard = self._where.get(sid)
        if shard is None:
            raise UnknownSession(f"unknown session {sid!r} (deleted, expired after {self.ttl_s:.0f}s idle, "
                                 "or never created)")
        return shard

    async def create(self, env_id: str, seed: int | None, options: dict[str, Any]) -> bytes:
        if len(self._where) >= self.max_sessions:
            await self.reap()
        if len(self._where) >= self.max_sessions:
            raise TooManySessions(f"{self.max_sessions} sessions are open (the maximum); delete some or wait "
                                  f"for idle ones to expire after {self.ttl_s:.0f}s")
        shard = self._live_shard()
        if isinstance(shard, ProcessShard):
            await shard.ready()
        sid = uuid.uuid4().hex
        self._where[sid] = None  # type: ignore[assignment]  # the slot is taken while the env is built
        if isinstance(shard, ProcessShard):
            shard.sessions += 1
        try:
            out = await shard.call("create", sid, env_id, seed, options)
        except BaseException:
            self._forget(sid, shard)
            raise
        self._where[sid] = shard
        self._env_of[sid] = env_id
        return out

    def _forget(self, sid: str, shard: AnyShard | None = None) -> None:
        if shard is None:  # (not `or`: an empty LocalShard is falsy)
            shard = self._where.get(sid)
        self._where.pop(sid, None)
        self._env_of.pop(sid, None)
        if isinstance(shard, ProcessShard):
            shard.sessions -= 1

    async def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None) -> bytes:
        return await self._shard_of(sid).call("reset", sid, seed, options)

    async def step(self, sid: str, action: str) -> bytes:
        return await self._shard_of(sid).call("step", sid, action)

    async def step_batch(self, steps: list[tuple[str, str]], auto_reset: bool = False) -> list[bytes | Exception]:
        """One answer per step, in order: a `BatchStepResult` as JSON, or the step's exception.
        The shards step their parts at once."""
        results: list[bytes | Exception] = [None] * len(steps)  # type: ignore[list-item]
        parts: dict[int, tuple[AnyShard, list[tuple[int, str, str]]]] = {}
        for idx, (sid, action) in enumerate(steps):
            try:
                shard = self._shard_of(sid)
            except UnknownSession as e:
                results[idx] = e
                continue
            parts.setdefault(id(shard), (shard, []))[1].append((idx, sid, action))

        async def run(shard: AnyShard, items: list[tuple[int, str, str]]):
            try:
                out = await shard.call("step_batch", items, auto_reset)
                return [(i, r if isinstance(r, (bytes, Exception)) else _error_from(*r)) for i, r in out]
            except Exception as e:  # noqa: BLE001 - the shard failed as a whole: each of its steps says so
                return [(idx, e) for idx, _, _ in items]

        for part in await asyncio.gather(*(run(shard, items) for shard, items in parts.values())):
            for idx, res in part:
                results[idx] = res
        return results

    async def delete(self, sid: str) -> None:
        shard = self._shard_of(sid)
        try:
            if not shard.dead:
                await shard.call("delete", sid)
        except UnknownSession:
            pass  # expired in the worker meanwhile: gone either way
        finally:
            self._forget(sid, shard)

    async def reap(self) -> int:
        """Close idle sessions in every shard; how many closed."""
        closed = 0
        now = time.monotonic()
        for shard in {id(s): s for s in [*self.shards, *self._where.values()] if s is not None}.values():
            if shard.dead:  # its sessions answer 409 until deleted, or until the TTL after the death
                if now - shard.died_at > self.ttl_s:
                    gone = [sid for sid, s in self._where.items() if s is shard]
                    for sid in gone:
                        self._forget(sid, shard)
                    closed += len(gone)
                continue
            try:
                expired = await shard.call("reap")
            except SessionFailed:
                continue
            for sid in expired:
                self._forget(sid, shard)
            closed += len(expired)
        return closed

    async def probe(self) -> None:
        """Every worker answers and can play a Points24 step."""
        dead = [s.dead for s in self.shards if s.dead]
        if dead and not any(not s.dead for s in self.shards):
            raise RuntimeError("; ".join(dead))
        await asyncio.gather(*(s.call("probe") for s in self.shards if not s.dead))

    def by_env(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for env_id in self._env_of.values():
            out[env_id] = out.get(env_id, 0) + 1
        return out
