"""Sessions: one env each, a TTL, a maximum count, and failures kept to the session that failed.

No FastAPI and no event loop here: the methods are plain calls, made from an env worker's threads
(services/envs/workers.py), one at a time per session (a lock each). A batch's slow-env steps run
in the manager's own pool, so a slow ALFWorld step does not hold back the rest of the batch.
An exception inside an env marks its session failed: that call and every later one get
`SessionFailed` (the app answers 409) until the session is deleted; the service carries on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from services.envs.base import EnvOptionError, EpisodeOver, Obs, StepResult, TextActionEnv
from services.envs.registry import Registry
from services.envs.render import to_png_b64

log = logging.getLogger(__name__)


class UnknownSession(KeyError):
    pass


class SessionFailed(RuntimeError):
    pass


class TooManySessions(RuntimeError):
    pass


@dataclass
class Session:
    session_id: str
    env_id: str
    env: TextActionEnv
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: str | None = None
    steps: int = 0


class PngCache:
    """Encoded images by content key. Encoding is most of a card-game step's cost, and images
    repeat: a penalised action leaves the picture as it was, every hand starts from the same few
    frames. Bounded (FIFO); thread-safe."""

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self._items: OrderedDict[Hashable, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def encode(self, obs: Obs) -> str | None:
        if not obs.has_image:
            return None
        key = obs.image_key
        encode = obs.png or (lambda: to_png_b64(obs.image))
        if key is None:
            return encode()
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self.hits += 1
                return found
        data = encode()
        with self._lock:
            self.misses += 1
            self._items[key] = data
            if len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data


PNG_CACHE = PngCache()


def observation_dict(obs: Obs) -> dict[str, Any]:
    return {"image": PNG_CACHE.encode(obs), "text": obs.text, "instruction": obs.instruction,
            "admissible_actions": obs.admissible_actions}


def step_dict(result: StepResult) -> dict[str, Any]:
    return {"observation": observation_dict(result.observation), "reward": float(result.reward),
            "terminated": bool(result.terminated), "truncated": bool(result.truncated), "info": result.info}


class SessionManager:
    def __init__(self, registry: Registry, max_sessions: int = 256, ttl_s: float = 1800.0, workers: int = 4,
                 on_step: Callable[[str, float], None] | None = None, on_failure: Callable[[str], None] | None = None):
        self.registry = registry
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="env")
        self.workers = workers
        self._sessions: dict[str, Session] = {}
        self._guard = threading.Lock()
        self._prefetch_due: OrderedDict[str, None] = OrderedDict()  # sessions whose next reset is not prepared
        self._on_step = on_step or (lambda env_id, seconds: None)
        self._on_failure = on_failure or (lambda env_id: None)

    def shutdown(self) -> None:
        for sid, session in list(self._sessions.items()):
            if session is not None:
                self.delete(sid)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        return len(self._sessions)

    def by_env(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in list(self._sessions.values()):
            out[s.env_id] = out.get(s.env_id, 0) + 1
        return out

    # -- lifecycle ---------------------------------------------------------------------------------
    def create(self, env_id: str, seed: int | None, options: dict[str, Any], session_id: str | None = None
               ) -> tuple[str, dict[str, Any], dict]:
        with self._guard:
            if len(self._sessions) >= self.max_sessions:
                self._reap_locked()
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(f"{self.max_sessions} sessions are open (the maximum); delete some or wait "
                                      f"for idle ones to expire after {self.ttl_s:.0f}s")
            # Reserve the slot before the (possibly slow) env construction.
            sid = session_id or uuid.uuid4().hex
            self._sessions[sid] = None  # type: ignore[assignment]
        try:
            env = self.registry.make(env_id, options)
            session = Session(sid, env_id, env)
            with session.lock:
                obs, info = self._guarded(session, lambda: env.reset(seed=seed))
        except BaseException:
            with self._guard:
                self._sessions.pop(sid, None)
            raise
        with self._guard:
            self._sessions[sid] = session
        self._prefetch_due[sid] = None
        return sid, observation_dict(obs), info

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:  # also a slot reserved by a create still in progress
            raise UnknownSession(f"unknown session {session_id!r} (deleted, expired after {self.ttl_s:.0f}s idle, "
                                 "or never created)")
        if session.failed:
            raise SessionFailed(f"session {session_id} failed: {session.failed}; delete it and create a new one")
        return session

    def delete(self, session_id: str) -> None:
        with self._guard:
            session = self._sessions.get(session_id)
            if session is None:
                raise UnknownSession(f"unknown session {session_id!r}")
            del self._sessions[session_id]
        with session.lock:  # let a step in flight finish before the env goes away
            try:
                session.env.close()
            except Exception:  # noqa: BLE001 - closing a broken env must not fail the delete
                log.warning("closing session %s raised", session_id, exc_info=True)

    def _reap_locked(self) -> list[str]:
        now = time.monotonic()
        expired = [sid for sid, s in self._sessions.items() if s is not None and now - s.last_used > self.ttl_s]
        closed: list[str] = []
        for sid in expired:
            session = self._sessions[sid]
            if not session.lock.acquire(blocking=False):  # a step is running: not idle after all
                continue
            try:
                del self._sessions[sid]
                session.env.close()
            except Exception:  # noqa: BLE001
                log.warning("closing expired session %s raised", sid, exc_info=True)
            finally:
                session.lock.release()
            closed.append(sid)
        if closed:
            log.info("expired %d idle session(s)", len(closed))
        return closed

    def reap(self) -> list[str]:
        """Close the sessions idle for longer than the TTL; their ids."""
        with self._guard:
            return self._reap_locked()

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

    def reset(self, session_id: str, seed: int | None, options: dict[str, Any] | None) -> tuple[dict, dict]:
        session = self.get(session_id)
        with session.lock:
            if session.failed:
                raise SessionFailed(f"session {session_id} failed: {session.failed}")
            session.last_used = time.monotonic()
            obs, info = self._guarded(session, lambda: session.env.reset(seed=seed, options=options))
        self._prefetch_due[session_id] = None
        return observation_dict(obs), info

    def step(self, session_id: str, action: str, auto_reset: bool = False) -> dict[str, Any]:
        session = self.get(session_id)
        with session.lock:
            if session.failed:
                raise SessionFailed(f"session {session_id} failed: {session.failed}")
            session.last_used = time.monotonic()
            t0 = time.perf_counter()
            result = self._guarded(session, lambda: session.env.step(action))
            out = step_dict(result)
            session.steps += 1
            if auto_reset and (result.terminated or result.truncated):
                obs, info = self._guarded(session, lambda: session.env.reset())
                out["reset"] = {"observation": observation_dict(obs), "info": info}
                self._prefetch_due[session_id] = None
        self._on_step(session.env_id, time.perf_counter() - t0)
        return out

    def step_group(self, items: list[tuple[int, str, str]], auto_reset: bool = False
                   ) -> list[tuple[int, dict[str, Any] | Exception]]:
        """Steps run in order in one worker; each item's failure is returned, not raised."""
        out: list[tuple[int, dict[str, Any] | Exception]] = []
        for idx, sid, action in items:
            try:
                out.append((idx, self.step(sid, action, auto_reset)))
            except Exception as e:  # noqa: BLE001 - reported per item (the session is already marked)
                out.append((idx, e))
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

    def is_fast(self, session_id: str) -> bool:
        """Whether the session's env steps cheaply (unknown sessions count as fast: they fail at once)."""
        session = self._sessions.get(session_id)
        return session is None or getattr(session.env, "fast", True)

    def step_batch(self, steps: list[tuple[str, str]], auto_reset: bool = False) -> list[dict[str, Any] | Exception]:
        """Run a batch: steps of one session stay in order. The cheap envs' steps all run in the
        calling thread (they are GIL-bound Python: spreading them over threads only added lock
        contention, +60% CPU per step measured); each slow env (ALFWorld) gets its own job in the
        pool, so one slow step does not hold the others back."""
        by_session: dict[str, list[tuple[int, str, str]]] = {}
        for idx, (sid, action) in enumerate(steps):
            by_session.setdefault(sid, []).append((idx, sid, action))
        fast: list[tuple[int, str, str]] = []
        slow: list[list[tuple[int, str, str]]] = []
        for sid, items in by_session.items():
            (fast.extend if self.is_fast(sid) else slow.append)(items)
        jobs = [self.executor.submit(self.step_group, g, auto_reset) for g in slow]
        results: list[dict[str, Any] | Exception] = [None] * len(steps)  # type: ignore[list-item]
        for group in [self.step_group(fast, auto_reset), *(j.result() for j in jobs)]:
            for idx, res in group:
                results[idx] = res
        return results
