"""The trainer's HTTP service (DESIGN §3.3): status, metrics, save-now, stop.

Runs inside the training process (uvicorn in a background thread, see `serve_in_thread`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from services.trainer.status import StatusBoard
from shared.schemas import ActionResponse, Health, TrainerStatus
from shared.server import ApiError, check_exposure, install_common, install_error_handlers, metrics_response, require_token

log = logging.getLogger(__name__)


async def get_board(request: Request) -> StatusBoard:
    return request.app.state.board


Board = Annotated[StatusBoard, Depends(get_board)]


def create_app(board: StatusBoard, checkpoint_timeout_s: float = 600.0) -> FastAPI:
    app = FastAPI(title="GTR-Turbo trainer", version="1")
    app.state.board = board
    install_error_handlers(app)
    install_common(app)

    @app.get("/healthz", response_model=Health)
    def healthz():
        return Health(service="trainer")

    @app.get("/readyz", response_model=Health)
    def readyz(board: Board):
        """Ready while the training loop runs (a dead or finished loop is not ready)."""
        if not board.loop_alive.is_set():
            raise ApiError(503, "not_ready", f"training loop not running (phase {board.status().phase})")
        return Health(service="trainer")

    @app.get("/metrics")
    def metrics(board: Board):
        return metrics_response(board.registry)

    @app.get("/v1/status", response_model=TrainerStatus)
    def status(board: Board):
        """Update, env steps, success rate, teacher version, phase and the last update's metrics."""
        return board.status()

    @app.post("/v1/checkpoint", response_model=ActionResponse, dependencies=[Depends(require_token)])
    async def checkpoint(board: Board):
        """Save a resumable checkpoint at the loop's next safe point (between two updates' phases);
        answers when it is written. Example: `curl -X POST localhost:8300/v1/checkpoint`."""
        if not board.loop_alive.is_set():
            raise ApiError(409, "conflict", "training loop is not running")
        ok = await asyncio.to_thread(board.request_checkpoint, checkpoint_timeout_s)
        if not ok:
            raise ApiError(503, "not_ready", f"checkpoint not written within {checkpoint_timeout_s:.0f}s")
        return ActionResponse(ok=True, detail=f"checkpoint saved in {board.status().run_dir}/checkpoint")

    @app.post("/v1/stop", response_model=ActionResponse, dependencies=[Depends(require_token)])
    def stop(board: Board):
        """Finish the current update, save a checkpoint, exit 0."""
        board.stop_requested.set()
        return ActionResponse(ok=True, detail="stopping after the current update")

    return app


class ServerThread:
    """uvicorn in a daemon thread (the training loop owns the main thread)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        check_exposure(host)

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.server.install_signal_handlers = lambda: None  # signals belong to the main thread
        self.thread = threading.Thread(target=self.server.run, name="trainer-http", daemon=True)

    def start(self, timeout: float = 10.0) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            log.warning("trainer HTTP service did not start (port in use?); training continues without it")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
