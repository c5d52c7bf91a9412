"""`python -m services.envs [flags]` = `gtr env serve [flags]`."""

import sys

from shared.cli import main

if __name__ == "__main__":
    sys.exit(main(["env", "serve", *sys.argv[1:]]))
