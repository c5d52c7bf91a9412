"""Adapters pushed while the teacher was down reach it when it is back (issue 11 §5): the real
teacher (tiny model, uvicorn on 127.0.0.1) is stopped and restarted on its port and store
between the trainer's pushes."""

from __future__ import annotations

import httpx
import pytest

from services.trainer.app import ServerThread
from services.trainer.config import TrainConfig
from services.trainer.guidance import TeacherLink
from trainer_services import free_port


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from test_teacher_service import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=1)


def _teacher(model_dir, store, port, merge=None) -> ServerThread:
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    settings = TeacherSettings(model=str(model_dir), store=str(store), device="cpu", **({"merge": merge} if merge else {}))
    return ServerThread(create_app(settings), "127.0.0.1", port).start(timeout=120)


def _stored_steps(url: str) -> list[int]:
    return sorted(c["step"] for c in httpx.get(f"{url}/v1/checkpoints").json()["checkpoints"])


@pytest.mark.parametrize("window, down_steps, kept, stored", [
    (None, [2, 3], [2, 3], [1, 2, 3, 4]),      # the teacher merges every checkpoint: all missed ones are re-sent
    (2, [2, 3, 4], [3, 4], [1, 3, 4, 5]),      # it merges the last 2: older missed ones are not worth sending
])
def test_adapters_pushed_while_the_teacher_was_down_are_resent(tmp_path, tiny_model_dir, adapter, window, down_steps,
                                                               kept, stored):
    port, store = free_port(), tmp_path / "store"
    url = f"http://127.0.0.1:{port}"
    merge = {"window": window} if window else None
    teacher = _teacher(tiny_model_dir, store, port, merge)
    link = TeacherLink(TrainConfig(teacher={"url": url, "retries": 0}))
    try:
        assert link.info() is not None and link.push(adapter, 1) is not None
        teacher.stop()
        for step in down_steps:
            assert link.push(adapter, step) is None
        assert sorted(link.unsent) == kept
        teacher = _teacher(tiny_model_dir, store, port, merge)  # back, on its store
        assert link.push(adapter, down_steps[-1] + 1) is not None
        assert link.unsent == {}
        assert _stored_steps(url) == stored
    finally:
        link.close()
        teacher.stop()
