"""How gristmill starts its own child processes and finds the data files it ships.

Both go through the `gristmill` import namespace, never through a folder of the working directory:
a child started as `python -m workers` would run whatever folder of that name sits where the user
happens to be, and a repository root on sys.path must never stand in for an installed package.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs `python -m MODULE ARGS` in this interpreter. `-P` (Python 3.11+) keeps the
    working directory off the child's sys.path, so the child imports gristmill and its dependencies
    from where this process does, whatever folders the directory holds."""
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe, "-m", module, *args]


def data_file(package: str, *parts: str) -> Path:
    """A data file shipped inside `package` (e.g. "gristmill.producers", "policies", "x.yaml"), as a
    filesystem path: the same file in a source checkout, an editable install and a wheel."""
    node = resources.files(package)
    for part in parts:
        node = node / part
    return Path(str(node))
