"""The teacher service's HTTP API (DESIGN §3.2). Routes only; the core is `service.py`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from shared.schemas import (ActionResponse, CheckpointList, CheckpointUploadResponse, GenerateRequest,
                            GenerateResponse, Health, LogitsRequest, LogitsResponse, MergeReport, TeacherInfo)
from shared.codecs import CodecError
from shared.server import (ErrorTable, error_responses, install_common, install_error_handlers, metrics_response,
                           require_token)
from services.teacher.backends import TeacherBackend, make_backend
from services.teacher.errors import (BaseMismatch, InvalidInput, MergeRefused, NonFiniteOutput, NotReady, StoreFailed,
                                     TooLarge, UnknownCheckpoint, Unsupported, UpstreamError)
from services.teacher.service import TeacherService
from services.teacher.settings import TeacherSettings
from services.teacher.store import CheckpointStore

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("teacher_requests", "Requests served", ["route", "status"], registry=self.registry)
        self.tokens = Counter("teacher_scored_tokens", "Completion tokens scored by /v1/logits", registry=self.registry)
        self.generated = Counter("teacher_generated_tokens", "Tokens generated", registry=self.registry)
        self.latency = Histogram("teacher_request_seconds", "Request latency", ["route"], registry=self.registry)
        self.version = Gauge("teacher_version", "Teacher version being served", registry=self.registry)
        self.checkpoints = Gauge("teacher_checkpoints", "Checkpoints in the store", registry=self.registry)
        self.merge_seconds = Gauge("teacher_last_merge_seconds", "Duration of the last merge", registry=self.registry)


async def get_service(request: Request) -> TeacherService:
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        raise NotReady("the teacher is still loading")
    return svc


# Module level: with postponed annotations FastAPI resolves route annotations in module globals.
Service = Annotated[TeacherService, Depends(get_service)]


# The one mapping from the core's typed errors to HTTP (DESIGN §3): status, default error code.
ERRORS: ErrorTable = {
    InvalidInput: (400, "bad_request"),
    CodecError: (400, "bad_request"),
    UnknownCheckpoint: (404, "unknown_checkpoint"),
    BaseMismatch: (409, "base_mismatch"),
    MergeRefused: (409, "merge_refused"),
    TooLarge: (413, "too_large"),
    Unsupported: (501, "not_implemented"),
    UpstreamError: (502, "upstream_error"),
    NotReady: (503, "not_ready"),
    NonFiniteOutput: (503, "non_finite"),
    StoreFailed: (507, "store_failed"),
}
_ROUTES = {"teacher", "checkpoints", "merge", "logits", "generate"}


class RequestMetrics:
    """ASGI middleware: count /v1 requests by route and final status, and time them (errors
    included: they are answered by the error table, after the route has raised)."""

    def __init__(self, app, metrics: "Metrics"):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        route = path.split("/")[2]
        route = route if route in _ROUTES else "other"
        status = [500]
        t0 = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def create_app(settings: TeacherSettings | None = None, backend: TeacherBackend | None = None,
               background_merges: bool = True) -> FastAPI:
    """`settings` configure the backend and store; a prebuilt `backend` (tests) skips loading one."""
    if settings is None:
        raise ValueError("create_app needs TeacherSettings (at least model and store)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        be = backend
        if be is None:
            be = await run_in_threadpool(make_backend, settings.backend, **settings.backend_settings())
        store = CheckpointStore(settings.store)
        service = await run_in_threadpool(
            lambda: TeacherService(be, store, settings.merge,
                                   max_upload_bytes=int(settings.max_upload_mb * 2**20),
                                   merge_device=settings.merge_device, background=background_merges))
        app.state.service = service
        log.info("teacher ready: backend %s, base %s, version %d, %d checkpoints", be.name, be.base_model,
                 service.version, len(store))
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="GTR-Turbo teacher", version="1", lifespan=lifespan,
                  description="Merged-checkpoint teacher: LoRA checkpoints in, TIES-merged teacher log-probs "
                              "and generations out (DESIGN §3.2).")
    install_error_handlers(app, ERRORS)
    install_common(app)
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(service="teacher")

    @app.get("/readyz", response_model=Health, responses=error_responses(503))
    def readyz(svc: Service) -> Health:
        """Ready when the backend answers a one-token forward (hf/vllm) or its endpoint (openai)."""
        try:
            svc.backend.check_ready()
        except NotReady:
            raise
        except Exception as e:  # noqa: BLE001 - any engine failure reads as "not ready"
            raise NotReady(f"{type(e).__name__}: {e}") from e
        return Health(status="ready", service="teacher")

    @app.get("/metrics")
    def metrics_route(request: Request):
        svc = getattr(request.app.state, "service", None)
        if svc is not None:
            metrics.version.set(svc.version)
            metrics.checkpoints.set(len(svc.store))
        return metrics_response(metrics.registry)

    @app.get("/v1/teacher", response_model=TeacherInfo, responses=error_responses(503))
    def teacher_info(svc: Service) -> TeacherInfo:
        """The served version, backend, base model, tokenizer fingerprint and merge settings."""
        return svc.info()

    @app.post("/v1/checkpoints", response_model=CheckpointUploadResponse, dependencies=[Depends(require_token)],
              openapi_extra={"requestBody": UPLOAD_BODY}, responses=error_responses(400, 409, 413, 501, 503, 507))
    async def upload_checkpoint(request: Request, svc: Service) -> CheckpointUploadResponse:
        """Upload a peft LoRA adapter (multipart: files `adapter_model`, `adapter_config`; field `step`).

        `curl -F adapter_model=@adapter_model.safetensors -F adapter_config=@adapter_config.json
        -F step=3 http://127.0.0.1:8200/v1/checkpoints`
        """
        up = await read_upload(request.headers, request.stream(), svc.max_upload_bytes)
        item, scheduled = await run_in_threadpool(svc.add_checkpoint, up.model_bytes, up.config_bytes, up.step,
                                                  up.base_fingerprint)
        metrics.checkpoints.set(len(svc.store))
        return CheckpointUploadResponse(checkpoint_id=item.checkpoint_id, merge_scheduled=scheduled)

    @app.get("/v1/checkpoints", response_model=CheckpointList, responses=error_responses(503))
    def list_checkpoints(svc: Service) -> CheckpointList:
        return CheckpointList(checkpoints=[svc.checkpoint_info(c) for c in svc.store.list()])

    @app.delete("/v1/checkpoints/{checkpoint_id}", response_model=ActionResponse,
                dependencies=[Depends(require_token)], responses=error_responses(404, 503))
    def delete_checkpoint(checkpoint_id: str, svc: Service) -> ActionResponse:
        """Remove a checkpoint from the store; the served teacher changes at the next merge."""
        svc.delete_checkpoint(checkpoint_id)
        return ActionResponse(detail=f"deleted {checkpoint_id}")

    @app.post("/v1/merge", response_model=MergeReport, dependencies=[Depends(require_token)],
              responses=error_responses(409, 503))
    def merge(svc: Service) -> MergeReport:
        """Merge now; returns the new version and the merge statistics."""
        report = svc.merge_now()
        metrics.merge_seconds.set(report.seconds)
        metrics.version.set(svc.version)
        return report

    @app.post("/v1/logits", response_model=LogitsResponse, responses=error_responses(400, 409, 413, 501, 503))
    def logits(req: LogitsRequest, svc: Service) -> LogitsResponse:
        """The teacher's log-prob of each given completion token (one forward, fp32 log-softmax).

        `{"items": [{"messages": [{"role": "user", "content": "hi"}], "completion_text": "hello"}]}`
        """
        version, items = svc.logprobs(req)
        metrics.tokens.inc(sum(len(r.token_ids) for r in items))
        return LogitsResponse(teacher_version=version, items=items)

    @app.post("/v1/generate", response_model=GenerateResponse, responses=error_responses(400, 413, 502, 503))
    def generate(req: GenerateRequest, svc: Service) -> GenerateResponse:
        """Sample (or greedy at temperature 0) a completion per item, with per-token log-probs.

        `{"items": [{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 16, "seed": 0}]}`
        """
        version, items = svc.generate(req)
        metrics.generated.inc(sum(len(r.token_ids) for r in items))
        return GenerateResponse(teacher_version=version, items=items)

    return app


MULTIPART_OVERHEAD = 64 * 1024
"""Bytes of boundaries, part headers and form fields allowed on top of the upload limit."""

UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["adapter_model", "adapter_config", "step"],
        "properties": {
            "adapter_model": {"type": "string", "format": "binary",
                              "description": "adapter_model.safetensors as peft's save_pretrained writes it"},
            "adapter_config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
            "step": {"type": "integer", "minimum": 0, "description": "the trainer's update number"},
            "base_fingerprint": {"type": "string",
                                 "description": "shared.models.model_fingerprint of the base it was trained on"},
        },
    }}},
}
"""The multipart body of POST /v1/checkpoints, declared for /docs and the fuzzer (the route reads
the raw stream itself, so FastAPI cannot infer it)."""


@dataclass
class Upload:
    model_bytes: bytes
    config_bytes: bytes
    step: int
    base_fingerprint: str | None


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request body, refused with TooLarge as soon as it passes `limit` bytes: a 1.1 GB
    chunked upload stops at the limit instead of being read (and spooled) whole first."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise TooLarge(f"upload exceeds the limit of {limit} bytes (multipart overhead included)")
        yield chunk


async def read_upload(headers: Headers, stream: AsyncIterator[bytes], limit: int) -> Upload:
    """Parse the multipart upload while counting its bytes (DESIGN §3.2's form: files
    `adapter_model`, `adapter_config`; fields `step`, optional `base_fingerprint`)."""
    length = headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise TooLarge(f"upload of {length} bytes exceeds the limit of {limit}")
    if not headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInput("expected multipart/form-data with files adapter_model, adapter_config and field step")
    parser = MultiPartParser(headers, _capped(stream, limit + MULTIPART_OVERHEAD), max_files=2, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidInput(f"malformed multipart body: {e.message}") from e
    try:
        model_bytes = await _read_part(form, "adapter_model", limit)
        config_bytes = await _read_part(form, "adapter_config", limit)
        step_raw = form.get("step")
        if step_raw is None or isinstance(step_raw, UploadFile):
            raise InvalidInput("form field `step` (int) is required")
        try:
            step = int(step_raw)
        except ValueError as e:
            raise InvalidInput(f"step must be an integer, got {step_raw[:40]!r}") from e
        fp = form.get("base_fingerprint")
        fp = fp if isinstance(fp, str) and fp else None
    finally:
        await form.close()
    return Upload(model_bytes, config_bytes, step, fp)


async def _read_part(form, name: str, limit: int) -> bytes:
    part = form.get(name)
    if part is None:
        raise InvalidInput(f"multipart file `{name}` is required")
    if isinstance(part, str):  # a JSON config may arrive as a plain field
        data = part.encode()
    else:
        data = await part.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"`{name}` exceeds the upload limit of {limit} bytes")
    return data
