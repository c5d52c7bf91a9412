"""Configuration: pydantic models, YAML files, `--set a.b=c` overrides.

Every config model forbids unknown keys, so a typo fails at start-up with the key's dotted
path in the message instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A bad config file or override; the message names the key."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], c) with c parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = dict(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node[p] = dict(child)
            node = node[p]
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"'{key}': {e['msg']}")
    return "; ".join(lines)


def build_config(model: type[T], data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> T:
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `path` (YAML) into `model`, applying `key=value` overrides first."""
    data = load_yaml(path) if path else {}
    return build_config(model, data, overrides, source=str(path or "config"))


def url_list(value: str | list[str]) -> list[str]:
    """One URL or several (replicas): a list, or one string with commas. Empty entries dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    urls = [u.strip().rstrip("/") for u in items if u and u.strip()]
    if not urls:
        raise ConfigError("no URL given")
    return urls


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# --------------------------------------------------------------------------- CLI flags from models
# A setting is declared once, as a pydantic field with its constraint and docstring; these two
# functions derive its argparse flag and read it back. (pydantic-settings' CLI source would name
# nested fields `--merge.method`; our flag names are a contract, so the mapping stays explicit.)


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None, bool]:
    """(argparse type, choices, is_bool) of a field annotation such as `int | None` or a Literal."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return type(args[0]), list(args), False
    if annotation is bool:
        return None, None, True
    if annotation in (int, float, str):
        return annotation, None, False
    raise TypeError(f"no CLI flag for a field of type {annotation!r}")


def add_model_arguments(parser, model: type[BaseModel], dest_prefix: str = "", flag_prefix: str = "",
                        rename: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Add one flag per field of `model`: `--{flag_prefix}{field-name}` unless `rename` names it.

    Flags default to None, so an unset flag leaves the field's own default; the help text is the
    field's docstring plus its default. Returns {argparse dest: field name} for `arguments_to_data`.
    """
    from pydantic_core import PydanticUndefined

    rename = rename or {}
    dests: dict[str, str] = {}
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + rename.get(name, flag_prefix + name.replace("_", "-"))
        dest = dest_prefix + name
        typ, choices, is_bool = _flag_type(field.annotation)
        required = field.default is PydanticUndefined and field.default_factory is None
        help_text = (field.description or "").strip().replace("%", "%%")
        if not required and not is_bool and field.default is not None and field.default_factory is None:
            help_text += f" (default {field.default})"
        kw: dict[str, Any] = {"dest": dest, "help": help_text or None}
        if is_bool:
            kw.update(action="store_true", default=None)
        else:
            kw.update(type=typ, default=None, required=required, metavar=name.upper())
            if choices:
                kw["choices"] = choices
        parser.add_argument(flag, **kw)
        dests[dest] = name
    return dests


def arguments_to_data(args, dests: dict[str, str]) -> dict[str, Any]:
    """The flags the user set, as {field name: value} (unset flags left out: the defaults apply)."""
    return {field: getattr(args, dest) for dest, field in dests.items() if getattr(args, dest, None) is not None}
