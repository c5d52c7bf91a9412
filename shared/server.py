"""What every service's FastAPI app shares: error bodies, health routes, metrics, auth, serving.

Errors are JSON `{"error": code, "detail": text}` (DESIGN §3). A client's bad input is a 4xx;
anything unexpected is logged with its traceback and answered 500 with a generic detail.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 409: "conflict", 413: "too_large", 422: "invalid", 429: "too_many", 501: "not_implemented",
                 503: "not_ready"}


class ApiError(HTTPException):
    """Raise from routes with a stable error code: ApiError(404, "unknown_session", "...")."""

    def __init__(self, status_code: int, error: str, detail: str):
        super().__init__(status_code=status_code, detail=detail)
        self.error = error


def error_body(status: int, detail: Any, error: str | None = None) -> dict[str, str]:
    return {"error": error or _STATUS_CODES.get(status, "error"), "detail": detail if isinstance(detail, str) else str(detail)}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, exc.detail, getattr(exc, "error", None)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return JSONResponse(error_body(422, "; ".join(parts)), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}", "internal"), status_code=500)


async def require_token(request: Request) -> None:
    """Dependency for mutating routes: checks `Authorization: Bearer $GTR_API_TOKEN` when set.
    (async: FastAPI would run a plain function in its thread pool, a thread hop per request.)"""
    token = os.environ.get("GTR_API_TOKEN")
    if not token:
        return
    got = request.headers.get("authorization", "")
    if not secrets.compare_digest(got, f"Bearer {token}"):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (GTR_API_TOKEN)")


def metrics_response(registry) -> PlainTextResponse:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request drowns what happened; our clients log retries and failures.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
