"""`gtr env serve`: run the env service. Its flags come from `EnvServiceSettings`' fields."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any

from pydantic import AliasChoices, ValidationError

from services.envs.settings import EnvServiceSettings


def _flag(name: str, field) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def _env_vars(name: str, field) -> list[str]:
    if isinstance(field.validation_alias, AliasChoices):
        return [a for a in field.validation_alias.choices if isinstance(a, str) and a.isupper()]
    return [EnvServiceSettings.model_config["env_prefix"] + name.upper()]


def _scalar(annotation: Any) -> type:
    """int, float or str from `int`, `float | None`, ... (the only kinds of knob here)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    kinds = [a for a in args if a is not type(None)] or [annotation]
    return kinds[0] if kinds[0] in (int, float) else str


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per settings field; unset flags stay None, so the environment and defaults apply."""
    for name, field in EnvServiceSettings.model_fields.items():
        default = "min(4, CPUs)" if field.default_factory else field.default
        env = " / ".join(_env_vars(name, field))
        p.add_argument(_flag(name, field), dest=name, type=_scalar(field.annotation), default=None,
                       help=f"{field.description or ''} (env {env}; default {default})")


def settings_from_args(args: argparse.Namespace) -> EnvServiceSettings:
    given = {name: getattr(args, name) for name in EnvServiceSettings.model_fields if getattr(args, name, None) is not None}
    return EnvServiceSettings(**given)


def _serve(args: argparse.Namespace) -> int:
    from services.envs.app import create_app
    from shared.server import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"gtr env serve: bad setting: {e}", file=sys.stderr)
        return 2
    serve(create_app(settings), settings.host, settings.port, log_level=args.uvicorn_log_level)
    return 0


def register(subparsers) -> None:
    env = subparsers.add_parser("env", help="the env service (Points24, EZPoints, NumberLine, ALFWorld)")
    sub = env.add_subparsers(dest="env_command", metavar="SUBCOMMAND")
    p = sub.add_parser("serve", help="serve the envs over HTTP",
                       description="Serve Points24, EZPoints, NumberLine and ALFWorld over HTTP (DESIGN §3.1).")
    add_settings_flags(p)
    p.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(func=_serve)
    env.set_defaults(func=lambda args: (env.print_help(), 2)[1])
