"""Env service settings, declared once: each knob's type, constraint, default, environment variable
and help live on its field here; `gtr env serve`'s flags are derived from these fields (cli.py).

Precedence: a flag (or a keyword in tests), else the environment variable (`GTR_ENV_<NAME>`, or
the alias a field names), else the default. Bad values fail at start-up with the field's name.
"""

from __future__ import annotations

import os

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EnvServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GTR_ENV_", env_ignore_empty=True, extra="forbid",
                                      use_attribute_docstrings=True, validate_default=True)

    host: str = "127.0.0.1"
    """Bind address."""
    port: int = Field(default=8100, ge=1, le=65535)
    """Port."""
    max_sessions: int = Field(default=256, ge=1)
    """Open sessions at most; creating one more first expires idle ones, then answers 429. With the
    TTL, this bounds how long a client that holds every session keeps others out (docs/envs.md)."""
    ttl_s: float = Field(default=1800.0, gt=0, json_schema_extra={"flag": "--ttl"})
    """Idle seconds after which a session expires (no call touched it)."""
    procs: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=0, le=64)
    """Env worker processes: sessions are spread over them, so that a batched step uses that many
    cores. 0 runs the envs in the service process (one core for all steps, no hang isolation;
    easiest to debug)."""
    workers: int = Field(default=4, ge=1, le=256)
    """Threads per env worker process, so that a slow step (ALFWorld's) never blocks other sessions."""
    call_timeout_s: float = Field(default=60.0, gt=0, json_schema_extra={"flag": "--call-timeout"})
    """Deadline of one call to an env worker process (a batch part included). A worker past it is
    hung (stopped, deadlocked in native code): it is killed and replaced, its sessions answer 409."""
    max_batch_steps: int = Field(default=1024, ge=1)
    """Steps in one POST /v1/step at most (more: 413). A worker serves a batch in parts of
    `batch_part_steps`, so other sessions' calls are answered between the parts."""
    batch_part_steps: int = Field(default=64, ge=1)
    """Steps a worker takes for a batch before it serves other requests waiting for it."""
    alfworld_data: str | None = Field(default=None, validation_alias=AliasChoices("alfworld_data", "ALFWORLD_DATA"))
    """An alfworld-download tree (server configuration: sessions cannot choose it); without it
    ALFWorld serves the bundled games."""
