"""The sessions of one shard: an env each, a lock each, and failures kept to the session that failed.

No FastAPI, no event loop, no limits and no TTL here (those are the router's, routing.py): the
methods are plain calls that return plain objects (Obs, StepResult), made from a shard's threads,
one at a time per session. A batch's slow-env steps run in the table's own pool, so one slow
ALFWorld step does not hold back the rest of the batch. An exception inside an env marks its
session failed: that call and every later one get `SessionFailed` (the app answers 409) until
the session is deleted; the service carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from services.envs.base import EnvOptionError, EpisodeOver, Obs, StepResult, TextActionEnv
from services.envs.registry import Registry

log = logging.getLogger(__name__)


class UnknownSession(KeyError):
    """No such session (deleted, expired, never created): 404."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class SessionFailed(RuntimeError):
    """The session's env raised, or its worker process died or hung: 409 until it is deleted."""


class TooManySessions(RuntimeError):
    """The service holds its maximum of sessions: 429."""


class BatchTooLarge(ValueError):
    """More steps in one batch than the service takes: 413."""


@dataclass
class Session:
    session_id: str
    env_id: str
    env: TextActionEnv
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: str | None = None


@dataclass
class StepOutcome:
    """A step's result, and the next episode's start when auto-reset made one."""

    result: StepResult
    reset: tuple[Obs, dict[str, Any]] | None = None


class SessionTable:
    def __init__(self, registry: Registry, threads: int = 4,
                 on_step: Callable[[str, float], None] | None = None, on_failure: Callable[[str], None] | None = None):
        self.registry = registry
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env")
        self._sessions: dict[str, Session] = {}
        self._guard = threading.Lock()
        self._prefetch_due: OrderedDict[str, None] = OrderedDict()  # sessions whose next reset is not prepared
        self._on_step = on_step or (lambda env_id, seconds: None)
        self._on_failure = on_failure or (lambda env_id: None)

    def shutdown(self) -> None:
        for sid in list(self._sessions):
            try:
                self.delete(sid)
            except UnknownSession:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        return len(self._sessions)

    # -- lifecycle ---------------------------------------------------------------------------------
    def create(self, session_id: str, env_id: str, seed: int | None, options: dict[str, Any]) -> tuple[Obs, dict]:
        env = self.registry.make(env_id, options)
        session = Session(session_id, env_id, env)
        try:
            with session.lock:
                obs, info = self._guarded(session, lambda: env.reset(seed=seed))
        except Exception:
            env.close()
            raise
        with self._guard:
            self._sessions[session_id] = session
        self._prefetch_due[session_id] = None
        return obs, info

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"unknown session {session_id!r} (deleted, expired, or never created)")
        if session.failed:
            raise SessionFailed(f"session {session_id} failed: {session.failed}; delete it and create a new one")
        return session

    def delete(self, session_id: str) -> None:
        with self._guard:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise UnknownSession(f"unknown session {session_id!r}")
        with session.lock:  # let a step in flight finish before the env goes away
            try:
                session.env.close()
            except Exception:  # noqa: BLE001 - closing a broken env must not fail the delete
                log.warning("closing session %s raised", session_id, exc_info=True)

    # -- env calls ---------------------------------------------------------------------------------
    def _guarded(self, session: Session, fn):
        """Run an env call; client errors pass through, anything else fails the session."""
        try:
            return fn()
        except (EnvOptionError, EpisodeOver):
            raise
        except Exception as e:  # noqa: BLE001 - an env bug must fail its session, not the service
            session.failed = f"env {session.env_id!r} raised {type(e).__name__}: {e}"
            log.exception("session %s (%s) failed", session.session_id, session.env_id)
            self._on_failure(session.env_id)
            raise SessionFailed(f"session {session.session_id} failed: {session.failed}; delete it and create a new one") from e

    def reset(self, session_id: str, seed: int | None, options: dict[str, Any] | None) -> tuple[Obs, dict]:
        session = self.get(session_id)
        with session.lock:
            if session.failed:
                raise SessionFailed(f"session {session_id} failed: {session.failed}")
            out = self._guarded(session, lambda: session.env.reset(seed=seed, options=options))
        self._prefetch_due[session_id] = None
        return out

    def step(self, session_id: str, action: str, auto_reset: bool = False) -> StepOutcome:
        session = self.get(session_id)
        with session.lock:
            if session.failed:
                raise SessionFailed(f"session {session_id} failed: {session.failed}")
            t0 = time.perf_counter()
            result = self._guarded(session, lambda: session.env.step(action))
            outcome = StepOutcome(result)
            if auto_reset and (result.terminated or result.truncated):
                outcome.reset = self._guarded(session, lambda: session.env.reset())
                self._prefetch_due[session_id] = None
        self._on_step(session.env_id, time.perf_counter() - t0)
        return outcome

    def _step_group(self, items: list[tuple[int, str, str]], auto_reset: bool) -> list[tuple[int, StepOutcome | Exception]]:
        """Steps run in order in one thread; each item's failure is returned, not raised."""
        out: list[tuple[int, StepOutcome | Exception]] = []
        for idx, sid, action in items:
            try:
                out.append((idx, self.step(sid, action, auto_reset)))
            except Exception as e:  # noqa: BLE001 - reported per item (the session is already marked)
                out.append((idx, e))
        return out

    def is_fast(self, session_id: str) -> bool:
        """Whether the session's env steps cheaply (unknown sessions count as fast: they fail at once)."""
        session = self._sessions.get(session_id)
        return session is None or getattr(session.env, "fast", True)

    def step_batch(self, items: list[tuple[int, str, str]], auto_reset: bool = False
                   ) -> list[tuple[int, StepOutcome | Exception]]:
        """`items`: (index in the request, session, action). Steps of one session stay in order.
        The cheap envs' steps all run in the calling thread (GIL-bound Python: spreading them over
        threads only added lock contention, +60% CPU per step measured); each slow env (ALFWorld)
        gets its own job in the pool, so one slow step does not hold the others back."""
        by_session: dict[str, list[tuple[int, str, str]]] = {}
        for item in items:
            by_session.setdefault(item[1], []).append(item)
        fast: list[tuple[int, str, str]] = []
        slow: list[list[tuple[int, str, str]]] = []
        for sid, group in by_session.items():
            (fast.extend if self.is_fast(sid) else slow.append)(group)
        jobs = [self.executor.submit(self._step_group, g, auto_reset) for g in slow]
        out = self._step_group(fast, auto_reset)
        for job in jobs:
            out.extend(job.result())
        return out

    def prefetch_one(self) -> bool:
        """Prepare one session's next reset (`TextActionEnv.prefetch`), for a worker with nothing
        else to do; False when none is due. A busy session is skipped: its step may reset it."""
        while self._prefetch_due:
            try:
                sid, _ = self._prefetch_due.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                return False
            session = self._sessions.get(sid)
            if session is None or session.failed or not getattr(session.env, "fast", True):
                continue
            if not session.lock.acquire(blocking=False):
                continue
            try:
                session.env.prefetch()
            except Exception:  # noqa: BLE001 - only a cache warm-up: the real reset will report the error
                log.debug("prefetch for session %s raised", sid, exc_info=True)
            finally:
                session.lock.release()
            return True
        return False
