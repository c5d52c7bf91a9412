"""`python -m services.policy ...` = `gtr policy serve ...`."""

import sys

from shared.cli import main

if __name__ == "__main__":
    sys.exit(main(["policy", "serve", *sys.argv[1:]]))
