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


def test_a_replica_that_was_down_gets_the_checkpoints_it_missed_in_order(tmp_path, tiny_model_dir, adapter):
    """Two teacher replicas; one is down for two pushes. The other takes them (the update is
    pushed); the lagging one gets both, oldest first, before the next, once it is back, so the
    two store and serve the same checkpoints (#13: each replica merges the same checkpoints)."""
    import time

    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    teachers = [_teacher(tiny_model_dir, tmp_path / f"store{i}", p) for i, p in enumerate(ports)]
    link = TeacherLink(TrainConfig(teacher={"url": urls, "retries": 0}))
    try:
        assert link.push(adapter, 1) is not None
        teachers[1].stop()
        for step in (2, 3):
            assert link.push(adapter, step) is not None  # replica 0 took it: pushed
        assert sorted(link.unsent) == [2, 3] and link.lacking == {2: {1}, 3: {1}}
        assert _stored_steps(urls[0]) == [1, 2, 3]
        teachers[1] = _teacher(tiny_model_dir, tmp_path / "store1", ports[1])  # back, on its store
        assert link.push(adapter, 4) is not None
        assert link.unsent == {} and link.lacking == {}
        assert _stored_steps(urls[0]) == _stored_steps(urls[1]) == [1, 2, 3, 4]
        listed = httpx.get(f"{urls[1]}/v1/checkpoints").json()["checkpoints"]
        assert [c["step"] for c in sorted(listed, key=lambda c: c["created"])] == [1, 2, 3, 4]  # in step order

        def served(url):
            return sorted(httpx.get(f"{url}/v1/teacher").json()["served_checkpoints"])

        deadline = time.monotonic() + 120
        while (served(urls[0]) != served(urls[1]) or not served(urls[0])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served(urls[0]) == served(urls[1]) != []
    finally:
        link.close()
        for t in teachers:
            t.stop()


def test_a_replica_never_gets_a_newer_checkpoint_before_one_it_lacks(tmp_path, tiny_model_dir, adapter):
    """Replica 1's uploads of step 2 fail (a flaky link: the client raises 503 for that step
    while the server is up) for two pushes: step 3 waits for it rather than overtaking it."""
    from shared.client import ServiceError
    from shared.teacher_client import TeacherClient

    class FlakyUploads(TeacherClient):
        failing: set[int] = set()

        def upload_adapter(self, adapter_dir, step, base_fingerprint=None):
            if step in self.failing:
                raise ServiceError("teacher", "POST", "/v1/checkpoints", 503, "flaky link (test)")
            return super().upload_adapter(adapter_dir, step, base_fingerprint)

    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    teachers = [_teacher(tiny_model_dir, tmp_path / f"store{i}", p) for i, p in enumerate(ports)]
    link = TeacherLink(TrainConfig(teacher={"url": urls, "retries": 0}))
    flaky = link.replicas.clients[1] = FlakyUploads(urls[1], retries=0)
    try:
        assert link.push(adapter, 1) is not None
        flaky.failing = {2}
        assert link.push(adapter, 2) is not None and link.lacking == {2: {1}}
        assert link.push(adapter, 3) is not None and link.lacking == {2: {1}, 3: {1}}  # 3 waits behind 2
        flaky.failing = set()
        assert link.push(adapter, 4) is not None and link.unsent == {}
        listed = httpx.get(f"{urls[1]}/v1/checkpoints").json()["checkpoints"]
        assert [c["step"] for c in sorted(listed, key=lambda c: c["created"])] == [1, 2, 3, 4]
    finally:
        link.close()
        for t in teachers:
            t.stop()
