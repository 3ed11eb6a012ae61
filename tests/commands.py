"""How the tests start gristmill's processes: as a user does, through the `gristmill` console script
installed beside this interpreter (no PYTHONPATH, whatever the working directory)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _console_script() -> list[str]:
    exe = Path(sys.executable).with_name("gristmill")
    return [str(exe)] if exe.is_file() else [sys.executable, "-P", "-m", "gristmill"]


GRISTMILL = _console_script()
