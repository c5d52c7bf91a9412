"""HTTP client for our services: timeouts, retries with backoff, errors that say what happened.

Retries cover connection errors, timeouts and 503 (not ready / busy); anything else a server
answers is final and raised as `ServiceError` naming the service, the route and the reply.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

RETRY_STATUS = {502, 503, 504}


class ServiceError(RuntimeError):
    """A service answered with an error, or could not be reached after all retries."""

    def __init__(self, service: str, method: str, route: str, status: int | None, detail: str, error: str = ""):
        self.service, self.method, self.route, self.status, self.detail, self.error = service, method, route, status, detail, error
        where = f"{service} {method} {route}"
        what = f"HTTP {status}" if status is not None else "unreachable"
        super().__init__(f"{where}: {what}: {error + ': ' if error else ''}{detail}")


class ServiceClient:
    """Thin sync client. `get`/`post` return parsed JSON, or a model when `model=` is given."""

    def __init__(self, base_url: str, service: str = "service", timeout: float = 60.0, retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 8.0, token: str | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.service = service
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        token = token if token is not None else os.environ.get("GTR_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method: str, route: str, *, model: type[M] | None = None, retries: int | None = None,
                adapter: TypeAdapter | None = None, **kwargs: Any) -> Any:
        """`adapter` (instead of `model`) validates the body's bytes in one pass (`validate_json`):
        for big bodies ~2x faster than `json.loads` + `model_validate`."""
        attempts = (self.retries if retries is None else retries) + 1
        last: ServiceError | None = None
        for attempt in range(attempts):
            try:
                r = self._http.request(method, route, **kwargs)
            except (httpx.TransportError,) as e:  # connect errors, timeouts, broken connections
                last = ServiceError(self.service, method, route, None, f"{type(e).__name__}: {e} (at {self.base_url})")
            else:
                if r.status_code < 400:
                    if adapter is not None:
                        return adapter.validate_json(r.content)
                    data = r.json() if r.content else None
                    return model.model_validate(data) if model is not None else data
                err = self._error(method, route, r)
                if r.status_code not in RETRY_STATUS:
                    raise err
                last = err
            if attempt + 1 < attempts:
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                log.warning("%s; retrying in %.1fs (%d/%d)", last, delay, attempt + 1, attempts - 1)
                time.sleep(delay)
        assert last is not None
        raise last

    def _error(self, method: str, route: str, r: httpx.Response) -> ServiceError:
        error, detail = "", r.text[:2000]
        try:
            body = r.json()
            if isinstance(body, dict):
                error = str(body.get("error", ""))
                detail = body.get("detail", detail)
                detail = detail if isinstance(detail, str) else str(detail)
        except ValueError:
            pass
        return ServiceError(self.service, method, route, r.status_code, detail, error)

    def get(self, route: str, **kw: Any) -> Any:
        return self.request("GET", route, **kw)

    def post(self, route: str, json: Any = None, **kw: Any) -> Any:
        if isinstance(json, BaseModel):
            json = json.model_dump(mode="json", exclude_none=True)
        return self.request("POST", route, json=json, **kw)

    def delete(self, route: str, **kw: Any) -> Any:
        return self.request("DELETE", route, **kw)

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Poll /readyz until it answers 200; raise with what to do after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                r = self._http.get("/readyz", timeout=5.0)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(interval)
        raise ServiceError(self.service, "GET", "/readyz", None,
                           f"not ready after {timeout:.0f}s ({last}); is the {self.service} service running at {self.base_url}?")
