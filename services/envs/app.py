"""The env service's HTTP API (DESIGN §3.1). Routes, lifespan and the error table only: sessions
are routed by `routing.SessionRouter`, and their JSON is made by `wire` where the steps ran."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.envs import wire
from services.envs.base import EnvOptionError, EnvUnavailable, EpisodeOver, TextActionEnv
from services.envs.registry import Registry, UnknownEnv
from services.envs.routing import SessionRouter
from services.envs.sessions import BatchTooLarge, SessionFailed, TooManySessions, UnknownSession
from services.envs.settings import EnvServiceSettings
from shared.schemas import (ActionResponse, BatchStepRequest, BatchStepResult, CreateSessionRequest, EnvList, Health,
                            ResetRequest, ResetResponse, SessionResponse, StepRequest, StepResponse)
from shared.server import (ApiError, error_responses, install_common, install_error_handlers, metrics_response,
                           require_token)

log = logging.getLogger(__name__)

ERRORS: dict[type[Exception], tuple[int, str]] = {
    UnknownSession: (404, "unknown_session"),
    UnknownEnv: (404, "unknown_env"),
    EnvOptionError: (422, "invalid_option"),
    EnvUnavailable: (501, "env_unavailable"),
    SessionFailed: (409, "session_failed"),
    EpisodeOver: (409, "episode_over"),
    TooManySessions: (429, "too_many_sessions"),
    BatchTooLarge: (413, "batch_too_large"),
}
"""The one mapping from the core's typed errors to HTTP (stable codes that clients and tests use),
installed as the app's handlers (shared/server.py) and used for the steps of a batch."""


def api_error(exc: Exception) -> ApiError:
    """A batch step's error as the route's handlers would answer it."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            status, code = ERRORS[cls]
            return ApiError(status, code, str(exc))
    log.error("unexpected error type %s: %s", type(exc).__name__, exc)
    return ApiError(500, "internal", f"internal error: {type(exc).__name__}")


def json_response(data: bytes) -> Response:
    """JSON made by `wire` where the steps ran (pydantic-core: ~4x faster than the stdlib
    `json.dumps` behind `JSONResponse` on a batch of 32 steps with their base64 PNGs)."""
    return Response(data, media_type="application/json")


async def get_router(request: Request) -> SessionRouter:
    """async: FastAPI runs a plain-function dependency in its thread pool (a hop per request)."""
    return request.app.state.router


RouterDep = Annotated[SessionRouter, Depends(get_router)]


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.steps = Counter("env_steps", "env steps taken", ["env_id"], registry=self.registry)
        self.step_seconds = Histogram("env_step_seconds", "time of one env step (without image encoding)", ["env_id"],
                                      buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0),
                                      registry=self.registry)
        self.sessions_created = Counter("env_sessions_created", "sessions created", ["env_id"], registry=self.registry)
        self.session_failures = Counter("env_session_failures", "sessions failed by an env exception or their "
                                        "worker's death", ["env_id"], registry=self.registry)
        self.sessions_expired = Counter("env_sessions_expired", "sessions expired by the TTL", registry=self.registry)
        self.worker_deaths = Counter("env_worker_deaths", "env worker processes that died or were killed past "
                                     "their deadline (and were replaced)", registry=self.registry)
        self.sessions_open = Gauge("env_sessions_open", "open sessions", registry=self.registry)

    def on_steps(self, env_id: str, seconds: list[float]) -> None:
        self.steps.labels(env_id).inc(len(seconds))
        hist = self.step_seconds.labels(env_id)  # the label lookup once: it costs more than an observe
        for s in seconds:
            hist.observe(s)


def create_app(settings: EnvServiceSettings | None = None, envs: dict[str, type[TextActionEnv]] | None = None) -> FastAPI:
    settings = settings or EnvServiceSettings()
    metrics = Metrics()
    server_config = {"alfworld": {"data_root": settings.alfworld_data}} if settings.alfworld_data else {}
    registry = Registry(envs, server_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        router = SessionRouter(registry, max_sessions=settings.max_sessions, ttl_s=settings.ttl_s,
                               procs=settings.procs, threads=settings.workers, call_timeout_s=settings.call_timeout_s,
                               max_batch_steps=settings.max_batch_steps, batch_part_steps=settings.batch_part_steps,
                               on_steps=metrics.on_steps,
                               on_failure=lambda env_id: metrics.session_failures.labels(env_id).inc(),
                               on_worker_death=metrics.worker_deaths.inc)
        await router.start()
        app.state.router = router

        async def reaper():
            while True:
                await asyncio.sleep(max(0.2, min(settings.ttl_s / 4, 30.0)))
                try:
                    n = await router.reap()
                except Exception:  # noqa: BLE001 - the sweep runs again next time
                    log.exception("expiring idle sessions failed")
                    continue
                metrics.sessions_expired.inc(n)
                metrics.sessions_open.set(len(router))

        task = asyncio.create_task(reaper())
        log.info("env service ready: envs %s, max %d sessions, ttl %.0fs, %s, %d threads each",
                 sorted(registry.envs), settings.max_sessions, settings.ttl_s,
                 f"{settings.procs} worker processes" if settings.procs else "in the service process", settings.workers)
        try:
            yield
        finally:
            task.cancel()
            await router.close()

    app = FastAPI(title="GTR-Turbo env service", version="1", lifespan=lifespan,
                  description="Points24, EZPoints, NumberLine and ALFWorld over HTTP (DESIGN §3.1).")
    install_error_handlers(app, ERRORS)
    install_common(app)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics

    Auth = [Depends(require_token)]

    @app.get("/healthz", response_model=Health)
    async def healthz():
        return Health(status="ok", service="envs")

    @app.get("/readyz", response_model=Health, responses=error_responses(503))
    async def readyz(router: RouterDep):
        """Ready when every env worker answers, within a deadline, and can deal and step a Points24 episode."""
        try:
            await router.probe()
        except Exception as e:  # noqa: BLE001 - not ready, say why
            raise ApiError(503, "not_ready", f"env probe failed: {type(e).__name__}: {e}") from e
        return Health(status="ok", service="envs")

    @app.get("/metrics")
    async def metrics_route(router: RouterDep):
        metrics.sessions_open.set(len(router))
        return metrics_response(metrics.registry)

    @app.get("/v1/envs", response_model=EnvList)
    async def list_envs():
        """The env ids with their options (and defaults), action vocabularies and availability."""
        return {"envs": registry.specs()}

    @app.post("/v1/sessions", response_model=SessionResponse, dependencies=Auth,
              responses=error_responses(404, 409, 429, 501))
    async def create_session(body: CreateSessionRequest, router: RouterDep):
        """Create a session and reset its env. Example: `{"env_id": "points24", "seed": 3, "options": {"solvable_only": true}}`.
        404: unknown env id; 429: the server holds its maximum of sessions; 501: the env cannot run
        here (the message says what to install); 409: the env failed while starting."""
        out = await router.create(body.env_id, body.seed, body.options)
        metrics.sessions_created.labels(body.env_id).inc()
        metrics.sessions_open.set(len(router))
        return json_response(out)

    @app.post("/v1/sessions/{session_id}/reset", response_model=ResetResponse, dependencies=Auth,
              responses=error_responses(404, 409))
    async def reset_session(session_id: str, body: ResetRequest, router: RouterDep):
        """Start a new episode: `{"seed": 7}` reproduces an episode; without a seed the session's generator goes on.
        404: unknown session; 409: the session failed (its env raised, or its worker died or hung)."""
        return json_response(await router.reset(session_id, body.seed, body.options))

    @app.post("/v1/sessions/{session_id}/step", response_model=StepResponse, dependencies=Auth,
              responses=error_responses(404, 409))
    async def step_session(session_id: str, body: StepRequest, router: RouterDep):
        """Step with the model's raw output: `{"action": "{\\"thoughts\\": \\"...\\", \\"action\\": \\"8\\"}"}`.
        404: unknown session; 409: the episode is over (reset it), or the session failed."""
        return json_response(await router.step(session_id, body.action))

    @app.post("/v1/step", response_model=list[BatchStepResult], dependencies=Auth, responses=error_responses(413))
    async def step_batch(body: BatchStepRequest, router: RouterDep):
        """Step many sessions at once: `{"steps": [{"session_id": "...", "action": "..."}, ...]}`. One result per
        step, in order; a step that fails carries `error` and the others still run. With `"auto_reset": true` a
        session whose episode ended is reset in the same call and its new start comes back under `reset`.
        413: more steps than the server's `--max-batch-steps`."""
        results = await router.step_batch([(s.session_id, s.action) for s in body.steps], body.auto_reset)
        out: list[bytes] = []
        for item, res in zip(body.steps, results, strict=True):
            if isinstance(res, Exception):
                err = api_error(res)
                out.append(wire.batch_error_json(item.session_id, err.error, err.detail))
            else:
                out.append(res)
        return json_response(wire.batch_json(out))

    @app.delete("/v1/sessions/{session_id}", response_model=ActionResponse, dependencies=Auth,
                responses=error_responses(404))
    async def delete_session(session_id: str, router: RouterDep):
        """Close a session (also one that failed). 404: unknown session."""
        await router.delete(session_id)
        metrics.sessions_open.set(len(router))
        return {"ok": True, "detail": f"session {session_id} deleted"}

    return app
