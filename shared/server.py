"""What every service's FastAPI app shares: error bodies, health routes, metrics, auth, serving.

Errors are JSON `{"error": code, "detail": text}` (DESIGN §3). A client's bad input is a 4xx;
anything unexpected is logged with its traceback and answered 500 with a generic detail.
`install_common` puts on every app what a service on a user's machine needs against a browser
(allowed hosts, no cross-origin writes), the error shapes in its OpenAPI, and /docs served offline.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.schemas import ErrorResponse

log = logging.getLogger(__name__)

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                 409: "conflict", 413: "too_large", 422: "invalid", 429: "too_many", 501: "not_implemented",
                 503: "not_ready"}


class ApiError(HTTPException):
    """Raise from routes with a stable error code: ApiError(404, "unknown_session", "...")."""

    def __init__(self, status_code: int, error: str, detail: str):
        super().__init__(status_code=status_code, detail=detail)
        self.error = error


def error_body(status: int, detail: Any, error: str | None = None) -> dict[str, str]:
    return {"error": error or _STATUS_CODES.get(status, "error"), "detail": detail if isinstance(detail, str) else str(detail)}


ErrorTable = Mapping[type[BaseException], tuple[int, str]]
"""A service's one mapping from its core's typed errors to (HTTP status, default error code)."""


def install_error_handlers(app: FastAPI, errors: ErrorTable | None = None) -> None:
    """The JSON error bodies of DESIGN §3, plus the app's table of core errors.

    `errors` maps each typed error of the service's core to its status and default code; an
    exception's own `code` attribute, when it has one, is the more precise stable code. Handlers
    are looked up along the exception's MRO, so a subclass may have its own row.
    """
    for exc_type, (status, default_code) in (errors or {}).items():
        app.add_exception_handler(exc_type, _table_handler(status, default_code))

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


def _table_handler(status: int, default_code: str):
    async def handle(_: Request, exc: Exception):
        code = getattr(exc, "code", None) or default_code
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        return JSONResponse(error_body(status, detail, code), status_code=status)

    return handle


async def require_token(request: Request) -> None:
    """Dependency for mutating routes: checks `Authorization: Bearer $GTR_API_TOKEN` when set.
    (async: FastAPI would run a plain function in its thread pool, a thread hop per request.)"""
    token = os.environ.get("GTR_API_TOKEN")
    if not token:
        return
    # Compared as bytes: the header arrives as latin-1 text, and `compare_digest` raises
    # TypeError on a str with non-ASCII characters (a 500 for a client's bad header).
    got = request.headers.get("authorization", "").encode("latin-1")
    if not secrets.compare_digest(got, f"Bearer {token}".encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (GTR_API_TOKEN)")


# --- hosts and origins ---------------------------------------------------------------------

# Loopback and the compose service names (docker-compose.yml): a DNS-rebinding page reaches a
# service under its own host name, which is none of these.
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]", "envs", "teacher", "trainer", "policy")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _env_list(name: str) -> list[str]:
    return [h.strip() for h in os.environ.get(name, "").split(",") if h.strip()]


def allowed_hosts() -> list[str]:
    """`GTR_ALLOWED_HOSTS` (comma-separated host names; `*.example.com` patterns; `*` allows any),
    else `DEFAULT_ALLOWED_HOSTS`."""
    return _env_list("GTR_ALLOWED_HOSTS") or list(DEFAULT_ALLOWED_HOSTS)


class OriginCheck:
    """Refuses state-changing requests whose `Origin` is not the service itself (nor one listed in
    `GTR_ALLOWED_ORIGINS`). Browsers send `Origin` on every cross-origin POST/DELETE, so a web page
    the user visits cannot upload to, merge on or stop a service on 127.0.0.1; clients that are not
    browsers (curl, our clients) send none and pass. /docs' "Try it out" is same-origin and passes."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str] | None = None):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in (allowed_origins or [])}

    def _ok(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.allowed or origin in self.allowed:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self._ok(origin, headers.get("host", "")):
                body = error_body(403, f"cross-origin {scope['method']} from {origin!r} refused "
                                       "(list trusted origins in GTR_ALLOWED_ORIGINS)", "forbidden_origin")
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_host_checks(app: FastAPI, hosts: list[str] | None = None, origins: list[str] | None = None) -> None:
    """Only the allowed Host headers (Starlette's TrustedHostMiddleware: 400 otherwise), and no
    state-changing request from a foreign Origin (403). Defaults from the environment."""
    app.add_middleware(OriginCheck, allowed_origins=origins if origins is not None else _env_list("GTR_ALLOWED_ORIGINS"))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts or allowed_hosts(), www_redirect=False)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str) -> None:
    """Refuse to serve beyond loopback without a token where it was published on purpose:
    compose passes `GTR_PUBLISH_ADDR` (where the ports are published on the host). A plain
    non-loopback bind only warns (inside a container, 0.0.0.0 is how a service is reached at all)."""
    if os.environ.get("GTR_API_TOKEN"):
        return
    published = os.environ.get("GTR_PUBLISH_ADDR", "")
    if published and not is_loopback(published):
        raise SystemExit(f"GTR_PUBLISH_ADDR={published} publishes this service beyond loopback: set GTR_API_TOKEN "
                         "(every mutating route then needs `Authorization: Bearer $GTR_API_TOKEN`)")
    if not published and not is_loopback(host):
        log.warning("serving on %s without GTR_API_TOKEN: anyone who reaches this address can call every route", host)


# --- OpenAPI: the error bodies as they are -------------------------------------------------

def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error codes it can answer, each with the ErrorResponse body.
    Example: `@app.get("/v1/x/{id}", responses=error_responses(404, 409))`."""
    return {code: {"model": ErrorResponse, "description": _STATUS_CODES.get(code, "error")} for code in codes}


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def install_openapi_errors(app: FastAPI) -> None:
    """The OpenAPI says what the service answers: 422 is `ErrorResponse` (our handler's body, not
    FastAPI's default `HTTPValidationError`), a JSON body that does not parse is 400, and every
    state-changing route declares 401 (a token is set and missing) and 403 (a foreign Origin)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
        for path, path_item in schema.get("paths", {}).items():
            for method, op in path_item.items():
                responses = op.setdefault("responses", {})
                if path == "/metrics":  # every service's, answered by `metrics_response`
                    responses["200"] = {"description": "Prometheus text format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}
                if "422" in responses:
                    responses["422"] = {"description": "invalid request", "content": _error_content()}
                if "application/json" in op.get("requestBody", {}).get("content", {}):
                    # FastAPI's answer to a body that is not UTF-8 JSON at all
                    responses.setdefault("400", {"description": "body is not JSON", "content": _error_content()})
                if method.upper() not in _SAFE_METHODS:
                    responses.setdefault("401", {"description": "missing or wrong bearer token (GTR_API_TOKEN set)",
                                                 "content": _error_content()})
                    responses.setdefault("403", {"description": "cross-origin request refused",
                                                 "content": _error_content()})
        for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's, now unreferenced
            if f'"#/components/schemas/{name}"' not in json.dumps(schema):
                comps.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# --- /docs without a CDN --------------------------------------------------------------------

DOCS_ASSETS = "/docs-assets"


def _swagger_ui_dir() -> Path | None:
    try:
        import swagger_ui  # PyPI swagger-ui-py: ships Swagger UI 5's dist files (OpenAPI 3.1)
    except ImportError:
        return None
    path = Path(swagger_ui.__file__).parent / "static"
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def install_local_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's JS and CSS served by the service itself (FastAPI's "self-hosting
    JavaScript and CSS for docs"), so it works offline. Without the package, FastAPI's CDN page."""
    assets = _swagger_ui_dir()
    if assets is None or not app.docs_url or not app.openapi_url:
        log.warning("swagger-ui-py not installed: /docs loads Swagger UI from a CDN")
        return
    from starlette.staticfiles import StaticFiles

    docs_url, openapi_url, oauth2_url = app.docs_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != docs_url]
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    async def swagger_ui_html(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url=root + oauth2_url if oauth2_url else None,
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
                                   swagger_ui_parameters=app.swagger_ui_parameters)

    app.add_route(docs_url, swagger_ui_html, include_in_schema=False)


def install_method_not_allowed(app: FastAPI) -> None:
    """405 with an `Allow` header naming every method the path serves. Starlette names only the
    first route that matched the path, so GET and POST on /v1/checkpoints (two routes) said "GET"."""
    from starlette.routing import Match

    async def _405(request: Request, exc: StarletteHTTPException):
        methods: set[str] = set()
        for route in app.router.routes:
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match != Match.NONE and getattr(route, "methods", None):
                methods |= set(route.methods)
        headers = {"Allow": ", ".join(sorted(methods))} if methods else getattr(exc, "headers", None)
        return JSONResponse(error_body(405, exc.detail, getattr(exc, "error", None)), status_code=405, headers=headers)

    app.add_exception_handler(405, _405)


def install_common(app: FastAPI) -> None:
    """Everything every service's app gets beside its error handlers: host and origin checks,
    the error codes in its OpenAPI, /docs served offline, and a true `Allow` on 405."""
    install_host_checks(app)
    install_method_not_allowed(app)
    install_openapi_errors(app)
    install_local_docs(app)


def metrics_response(registry) -> PlainTextResponse:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    check_exposure(host)

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def setup_logging(level: str = "INFO") -> None:
    # Under torchrun every rank logs to the same terminal: say which one.
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s")
    # One line per HTTP request drowns what happened; our clients log retries and failures.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
