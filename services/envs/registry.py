"""Which envs the service offers, their options and action vocabularies, and how to build one."""

from __future__ import annotations

from typing import Any

from services.envs.alfworld_env import AlfWorldEnv, AlfWorldThorEnv, alfworld_status
from services.envs.base import EnvOptionError, EnvUnavailable, TextActionEnv
from services.envs.cardgames import EZPointsEnv, Points24Env
from services.envs.numberline import NumberLineEnv

ENVS: dict[str, type[TextActionEnv]] = {
    "points24": Points24Env,
    "ezpoints": EZPointsEnv,
    "numberline": NumberLineEnv,
    "alfworld": AlfWorldEnv,
    "alfworld-thor": AlfWorldThorEnv,
}


class UnknownEnv(KeyError):
    """No env with that id: 404."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class Registry:
    """The env classes, plus per-env server configuration given to their constructors beside the
    client's options (ALFWorld's `data_root`): set by the operator, never by a client."""

    def __init__(self, envs: dict[str, type[TextActionEnv]] | None = None,
                 server_config: dict[str, dict[str, Any]] | None = None):
        self.envs = dict(ENVS if envs is None else envs)
        self.server_config = server_config or {}

    def unavailable_reason(self, env_id: str) -> str | None:
        cls = self.envs[env_id]
        if getattr(cls, "unavailable_reason", None):
            return cls.unavailable_reason
        if cls is AlfWorldEnv:
            ok, msg = alfworld_status()
            return None if ok else msg
        return None

    def specs(self) -> list[dict[str, Any]]:
        out = []
        for env_id, cls in self.envs.items():
            reason = self.unavailable_reason(env_id)
            actions = None
            if reason is None and cls.__dict__.get("actions") is not TextActionEnv.actions and env_id != "alfworld":
                try:
                    actions = cls().actions()
                except (EnvOptionError, EnvUnavailable):
                    actions = None
            out.append({"env_id": env_id, "description": cls.description,
                        "options": dict(cls.default_options),
                        "actions": actions, "max_steps": cls.max_steps,
                        "observation": {"image_shape": list(cls.image_shape) if cls.image_shape else None,
                                        "admissible_actions": cls.lists_admissible_actions},
                        "available": reason is None, "unavailable_reason": reason})
        return out

    def make(self, env_id: str, options: dict[str, Any] | None = None) -> TextActionEnv:
        if env_id not in self.envs:
            raise UnknownEnv(f"unknown env_id {env_id!r}; available: {sorted(self.envs)}")
        reason = self.unavailable_reason(env_id)
        if reason is not None:
            raise EnvUnavailable(f"{env_id}: {reason}")
        cls = self.envs[env_id]
        options = options or {}
        # Checked before the call: an option named like a server setting must not reach it.
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            raise EnvOptionError(f"{env_id}: unknown option(s) {unknown}; known: {sorted(cls.default_options)}")
        return cls(**options, **self.server_config.get(env_id, {}))
