"""``python -m object2brain``: the same command line as ``object2brain``."""

from object2brain.cli import main

main()
