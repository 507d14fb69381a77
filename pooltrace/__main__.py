"""Entry point for ``python -m pooltrace``."""

from pooltrace.cli import main

if __name__ == "__main__":  # not when a worker process imports the parent's main module
    main()
