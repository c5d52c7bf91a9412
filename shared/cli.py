"""`gtr`: one CLI for the project. Each service registers its own subcommands.

    gtr tiny-model OUT [--seed N] [--size tiny|small|wide]
    gtr env serve ...            (services/envs/cli.py)
    gtr teacher serve|query ...  (services/teacher/cli.py)
    gtr policy serve ...         (services/policy/cli.py: the teacher's service in its `latest` role)
    gtr train|sft|eval ...       (services/trainer/cli.py)
    gtr up|demo ...              (services/launcher/cli.py)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define `register(subparsers)`; imported lazily so `gtr --help` stays fast and a
# missing optional dependency only breaks its own subcommand.
COMMAND_MODULES = ("services.envs.cli", "services.teacher.cli", "services.policy.cli", "services.trainer.cli",
                   "services.launcher.cli")


def _tiny_model(args: argparse.Namespace) -> int:
    from shared.tiny_model import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed, size=args.size)
    print(f"tiny {args.size} Qwen2.5-VL model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gtr",
        description="GTR-Turbo services: multi-turn RL for VLM agents guided by a merged-checkpoint teacher.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("tiny-model", help="build a tiny random-weight Qwen2.5-VL model offline",
                       description="Build a Qwen2.5-VL-architecture model with random weights and a BPE tokenizer "
                                   "trained offline on our env prompts. Same seed, byte-identical files.")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight and tokenizer seed (default 0)")
    p.add_argument("--size", choices=["tiny", "small", "wide"], default="tiny",
                   help="tiny: ~0.2M params, for tests; small: ~4M params, for learning runs on CPU; wide: "
                        "Qwen2.5-VL-7B's real vocabulary (152k), chat template and image settings on a 2-layer body "
                        "(~80M params; needs the `wide` extra for the tokenizer)")
    p.set_defaults(func=_tiny_model)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the module itself is not there (yet)
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from shared.server import setup_logging

    setup_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP where a command turns them into it
        return 128 + getattr(e, "signum", 2)
    except Exception as e:  # noqa: BLE001 - a CLI prints what went wrong, not a traceback
        from shared.config import ConfigError

        if isinstance(e, (ConfigError, FileNotFoundError)):
            print(f"gtr: error: {e}", file=sys.stderr)
            return 2
        logging.getLogger("gtr").exception("command failed")
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
