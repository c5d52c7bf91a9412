"""Shared fixtures: the offline tiny model (built once per test session) and a free port."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Starlette's TestClient sends `Host: testserver`; the services allow only their own names.
os.environ.setdefault("GTR_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],envs,teacher,trainer,policy,testserver")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from shared.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0, size="tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from shared.models import load_model_and_processor

    return load_model_and_processor(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
