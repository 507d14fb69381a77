"""Entry point for ``python -m pooltrace``."""

from pooltrace.cli import main

main()
