import sys

from shared.cli import main

sys.exit(main(["up", *sys.argv[1:]]))
