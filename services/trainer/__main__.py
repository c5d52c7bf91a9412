"""`python -m services.trainer [train|sft|eval] ...` (default: train)."""

import sys

from shared.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    top = []  # `--log-level L` before the subcommand belongs to the top-level parser
    if argv[:1] == ["--log-level"]:
        top, argv = argv[:2], argv[2:]
    if not argv or argv[0] not in ("train", "sft", "eval", "-h", "--help"):
        argv = ["train", *argv]
    sys.exit(main(top + argv))
