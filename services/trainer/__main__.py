"""`python -m services.trainer [train|sft|eval] ...` (default: train)."""

import sys

from shared.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("train", "sft", "eval", "-h", "--help"):
        argv = ["train", *argv]
    sys.exit(main(argv))
