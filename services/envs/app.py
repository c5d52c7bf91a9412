"""The env service's HTTP API (DESIGN §3.1). Routes only; the work is in sessions.py and the envs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

import pydantic_core
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.envs.base import EnvOptionError, EnvUnavailable, EpisodeOver, TextActionEnv
from services.envs.registry import Registry, UnknownEnv
from services.envs.sessions import SessionFailed, TooManySessions, UnknownSession
from services.envs.settings import EnvServiceSettings
from services.envs.workers import Sessions
from shared.schemas import (ActionResponse, BatchStepRequest, BatchStepResult, CreateSessionRequest, EnvList, Health, ResetRequest,
                            ResetResponse, SessionResponse, StepRequest, StepResponse)
from shared.server import ApiError, error_body, install_common, install_error_handlers, metrics_response, require_token

log = logging.getLogger(__name__)


def api_error(exc: Exception) -> ApiError:
    """The one mapping from core errors to HTTP errors (stable codes that clients and tests use)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownSession):
        return ApiError(404, "unknown_session", exc.args[0])
    if isinstance(exc, UnknownEnv):
        return ApiError(404, "unknown_env", exc.args[0])
    if isinstance(exc, EnvOptionError):
        return ApiError(422, "invalid_option", str(exc))
    if isinstance(exc, EnvUnavailable):
        return ApiError(501, "env_unavailable", str(exc))
    if isinstance(exc, SessionFailed):
        return ApiError(409, "session_failed", str(exc))
    if isinstance(exc, EpisodeOver):
        return ApiError(409, "episode_over", str(exc))
    if isinstance(exc, TooManySessions):
        return ApiError(429, "too_many_sessions", str(exc))
    log.error("unexpected error type %s: %s", type(exc).__name__, exc)
    return ApiError(500, "internal", f"internal error: {type(exc).__name__}")


def json_response(data: bytes) -> Response:
    """JSON made by the env workers (`pydantic_core.to_json`: ~4x faster than the stdlib
    `json.dumps` behind `JSONResponse` on a batch of 32 steps with their base64 PNGs)."""
    return Response(data, media_type="application/json")


async def get_sessions(request: Request) -> Sessions:
    """async: FastAPI runs a plain-function dependency in its thread pool (a hop per request)."""
    return request.app.state.sessions


SessionsDep = Annotated[Sessions, Depends(get_sessions)]


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.steps = Counter("env_steps", "env steps taken", ["env_id"], registry=self.registry)
        self.step_seconds = Histogram("env_step_seconds", "time of one env step (incl. image encoding)", ["env_id"],
                                      buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0),
                                      registry=self.registry)
        self.sessions_created = Counter("env_sessions_created", "sessions created", ["env_id"], registry=self.registry)
        self.session_failures = Counter("env_session_failures", "sessions failed by an env exception", ["env_id"],
                                        registry=self.registry)
        self.sessions_expired = Counter("env_sessions_expired", "sessions expired by the TTL", registry=self.registry)
        self.worker_deaths = Counter("env_worker_deaths", "env worker processes that died (and were replaced)",
                                     registry=self.registry)
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
        manager = Sessions(registry, settings.max_sessions, settings.ttl_s, settings.procs, settings.workers,
                           on_steps=metrics.on_steps,
                           on_failure=lambda env_id: metrics.session_failures.labels(env_id).inc(),
                           on_worker_death=metrics.worker_deaths.inc)
        await manager.start()
        app.state.sessions = manager

        async def reaper():
            while True:
                await asyncio.sleep(max(1.0, min(settings.ttl_s / 4, 30.0)))
                try:
                    n = await manager.reap()
                except Exception:  # noqa: BLE001 - the sweep runs again next time
                    log.exception("expiring idle sessions failed")
                    continue
                metrics.sessions_expired.inc(n)
                metrics.sessions_open.set(len(manager))

        task = asyncio.create_task(reaper())
        log.info("env service ready: envs %s, max %d sessions, ttl %.0fs, %s, %d threads each",
                 sorted(registry.envs), settings.max_sessions, settings.ttl_s,
                 f"{settings.procs} worker processes" if settings.procs else "in the service process", settings.workers)
        try:
            yield
        finally:
            task.cancel()
            await manager.close()

    app = FastAPI(title="GTR-Turbo env service", version="1", lifespan=lifespan,
                  description="Points24, EZPoints, NumberLine and ALFWorld over HTTP (DESIGN §3.1).")
    install_error_handlers(app)
    install_common(app)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics

    Auth = [Depends(require_token)]

    async def call(coro):
        try:
            return await coro
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to its 4xx; unknown types are logged as 500
            raise api_error(e) from e

    @app.get("/healthz", response_model=Health)
    async def healthz():
        return Health(status="ok", service="envs")

    @app.get("/readyz", response_model=Health)
    async def readyz(manager: SessionsDep):
        """Ready when every env worker answers and can deal and step a Points24 episode."""
        try:
            await manager.probe()
        except Exception as e:  # noqa: BLE001 - not ready, say why
            raise ApiError(503, "not_ready", f"env probe failed: {type(e).__name__}: {e}") from e
        return Health(status="ok", service="envs")

    @app.get("/metrics")
    async def metrics_route(manager: SessionsDep):
        metrics.sessions_open.set(len(manager))
        return metrics_response(metrics.registry)

    @app.get("/v1/envs", response_model=EnvList)
    async def list_envs():
        """The env ids with their options (and defaults), action vocabularies and availability."""
        return {"envs": registry.specs()}

    @app.post("/v1/sessions", response_model=SessionResponse, dependencies=Auth)
    async def create_session(body: CreateSessionRequest, manager: SessionsDep):
        """Create a session and reset its env. Example: `{"env_id": "points24", "seed": 3, "options": {"solvable_only": true}}`."""
        out = await call(manager.create(body.env_id, body.seed, body.options))
        metrics.sessions_created.labels(body.env_id).inc()
        metrics.sessions_open.set(len(manager))
        return json_response(out)

    @app.post("/v1/sessions/{session_id}/reset", response_model=ResetResponse, dependencies=Auth)
    async def reset_session(session_id: str, body: ResetRequest, manager: SessionsDep):
        """Start a new episode: `{"seed": 7}` reproduces an episode; without a seed the session's generator goes on."""
        return json_response(await call(manager.reset(session_id, body.seed, body.options)))

    @app.post("/v1/sessions/{session_id}/step", response_model=StepResponse, dependencies=Auth)
    async def step_session(session_id: str, body: StepRequest, manager: SessionsDep):
        """Step with the model's raw output: `{"action": "{\\"thoughts\\": \\"...\\", \\"action\\": \\"8\\"}"}`."""
        return json_response(await call(manager.step(session_id, body.action)))

    @app.post("/v1/step", response_model=list[BatchStepResult], dependencies=Auth)
    async def step_batch(body: BatchStepRequest, manager: SessionsDep):
        """Step many sessions at once: `{"steps": [{"session_id": "...", "action": "..."}, ...]}`. One result per
        step, in order; a step that fails carries `error` and the others still run. With `"auto_reset": true` a
        session whose episode ended is reset in the same call and its new start comes back under `reset`."""
        results = await manager.step_batch([(s.session_id, s.action) for s in body.steps], body.auto_reset)
        out: list[bytes] = []
        for item, res in zip(body.steps, results, strict=True):
            if isinstance(res, Exception):
                err = api_error(res)
                out.append(pydantic_core.to_json(
                    {"session_id": item.session_id, "observation": None, "reward": 0.0, "terminated": False,
                     "truncated": False, "info": {}, "error": error_body(err.status_code, err.detail, err.error)}))
            else:
                out.append(res)  # made by the env worker, "reset" included when auto-reset
        # Spliced as made: re-validating 32 observations with base64 images through the response
        # model would cost more than the steps (the schema is still documented).
        return json_response(b"[" + b",".join(out) + b"]")

    @app.delete("/v1/sessions/{session_id}", response_model=ActionResponse, dependencies=Auth)
    async def delete_session(session_id: str, manager: SessionsDep):
        await call(manager.delete(session_id))
        metrics.sessions_open.set(len(manager))
        return {"ok": True, "detail": f"session {session_id} deleted"}

    return app
