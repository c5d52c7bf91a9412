"""A real HTTP server for client tests: a handler function served by uvicorn on 127.0.0.1.

    def handler(method, path, body):          # body: the request's JSON, or None
        return 503, {"error": "not_ready", "detail": "loading"}

    with serve(handler) as url:
        ServiceClient(url).get("/v1/x")
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import uvicorn

Handler = Callable[[str, str, Any], tuple[int, Any]]


def _app(handler: Handler):
    async def app(scope, receive, send):
        if scope["type"] != "http":  # lifespan: nothing to start or stop
            return
        raw, more = b"", True
        while more:
            msg = await receive()
            raw += msg.get("body", b"")
            more = msg.get("more_body", False)
        headers = dict(scope["headers"])
        body = json.loads(raw) if raw and headers.get(b"content-type") == b"application/json" else None
        status, reply = handler(scope["method"], scope["path"], body)
        out = json.dumps(reply).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
    return app


@contextmanager
def serve(handler: Handler) -> Iterator[str]:
    """Run `handler` behind uvicorn (its defaults: idle keep-alive connections closed after 5 s)
    in a daemon thread, on a port the OS picks; yield the base URL."""
    server = uvicorn.Server(uvicorn.Config(_app(handler), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            raise RuntimeError("fake HTTP server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)
