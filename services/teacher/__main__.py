"""`python -m services.teacher ...` = `gtr teacher serve ...`."""

import sys

from shared.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", "serve", *sys.argv[1:]]))
