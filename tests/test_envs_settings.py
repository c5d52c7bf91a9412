"""The env service's settings: one declaration per knob, the CLI derived from it, the contract
flags and environment variables kept."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.envs.cli import settings_from_args
from services.envs.settings import EnvServiceSettings
from shared.cli import build_parser

CONTRACT_FLAGS = ["--host", "--port", "--max-sessions", "--ttl", "--procs", "--workers", "--alfworld-data"]


def parse(*argv: str):
    return build_parser().parse_args(["env", "serve", *argv])


def test_every_setting_is_a_flag_and_the_contract_flags_stay(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    flags = {w.strip("[],") for w in text.split() if w.strip("[],").startswith("--")}
    assert set(CONTRACT_FLAGS) | {"--call-timeout", "--max-batch-steps", "--batch-part-steps"} <= flags
    assert len(flags - {"--help", "--uvicorn-log-level"}) == len(EnvServiceSettings.model_fields)
    for var in ["GTR_ENV_MAX_SESSIONS", "GTR_ENV_TTL_S", "GTR_ENV_PROCS", "GTR_ENV_WORKERS", "ALFWORLD_DATA"]:
        assert var in text, var


def test_flags_then_environment_then_defaults(monkeypatch):
    monkeypatch.setenv("GTR_ENV_PROCS", "3")
    monkeypatch.setenv("GTR_ENV_TTL_S", "12.5")
    monkeypatch.setenv("ALFWORLD_DATA", "/data/alfworld")
    monkeypatch.setenv("GTR_ENV_WORKERS", "")  # compose passes unset variables as empty: the default
    s = settings_from_args(parse("--procs", "0", "--max-sessions", "7"))
    assert (s.procs, s.max_sessions, s.ttl_s, s.alfworld_data, s.workers) == (0, 7, 12.5, "/data/alfworld", 4)
    assert settings_from_args(parse("--ttl", "3")).ttl_s == 3.0


@pytest.mark.parametrize("argv", [("--procs", "-1"), ("--ttl", "0"), ("--port", "70000"), ("--max-batch-steps", "0")])
def test_bad_values_fail_at_start_naming_the_setting(argv):
    with pytest.raises(ValidationError) as e:
        settings_from_args(parse(*argv))
    assert EnvServiceSettings.model_fields.keys() & {str(x["loc"][0]) for x in e.value.errors()}


def test_a_bad_environment_value_fails_too(monkeypatch):
    monkeypatch.setenv("GTR_ENV_MAX_SESSIONS", "lots")
    with pytest.raises(ValidationError, match="max_sessions"):
        EnvServiceSettings()
