"""Real env and teacher services for the trainer's end-to-end tests and benchmark: uvicorn in
threads on free ports (no doubles)."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_services(model_dir: str | Path | None, store_dir: str | Path | None, teacher: bool = True,
                     env: bool = True):
    """Yields (env_url or None, teacher_url or None) while the services run."""
    from services.envs.app import create_app as create_env_app
    from services.teacher.app import create_app as create_teacher_app
    from services.teacher.settings import TeacherSettings
    from services.trainer.app import ServerThread
    from shared.client import ServiceClient

    servers = []
    try:
        env_url = None
        if env:
            env_port = free_port()
            servers.append(ServerThread(create_env_app(), "127.0.0.1", env_port).start())
            env_url = f"http://127.0.0.1:{env_port}"
            ServiceClient(env_url, service="env").wait_ready(timeout=60)
        teacher_url = None
        if teacher:
            t_port = free_port()
            app = create_teacher_app(TeacherSettings(model=str(model_dir), store=str(store_dir), device="cpu"))
            servers.append(ServerThread(app, "127.0.0.1", t_port).start())
            teacher_url = f"http://127.0.0.1:{t_port}"
            ServiceClient(teacher_url, service="teacher").wait_ready(timeout=120)
        yield env_url, teacher_url
    finally:
        for s in reversed(servers):
            s.stop()
