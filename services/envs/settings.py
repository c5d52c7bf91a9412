"""Env service settings: CLI flags, else GTR_ENV_* environment variables, else defaults."""

from __future__ import annotations

import os

from pydantic import Field

from shared.config import StrictModel


def _env(name: str, default):
    value = os.environ.get(name)
    return default if value in (None, "") else value


class EnvServiceSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    max_sessions: int = Field(default_factory=lambda: int(_env("GTR_ENV_MAX_SESSIONS", 256)), ge=1)
    """Open sessions at most; creating one more first expires idle ones, then answers 429."""
    ttl_s: float = Field(default_factory=lambda: float(_env("GTR_ENV_TTL_S", 1800.0)), gt=0)
    """A session untouched this long is closed."""
    procs: int = Field(default_factory=lambda: int(_env("GTR_ENV_PROCS", min(4, os.cpu_count() or 1))), ge=0, le=64)
    """Env worker processes; sessions are spread over them, so a batched step uses that many
    cores. 0: envs run in the service process (one core for all env steps; easiest to debug)."""
    workers: int = Field(default_factory=lambda: int(_env("GTR_ENV_WORKERS", 4)), ge=1, le=256)
    """Threads per env worker process (a slow step, e.g. ALFWorld's, never blocks other sessions)."""
    alfworld_data: str | None = Field(default_factory=lambda: _env("ALFWORLD_DATA", None))
    """An alfworld-download tree; without it ALFWorld serves the bundled games."""
