"""`python -m gristmill ...`: the `gristmill` command."""

from gristmill.producers.cli import main

if __name__ == "__main__":
    main()
