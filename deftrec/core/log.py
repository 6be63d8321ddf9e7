"""Progress output: one readable line per event, written once (rank 0 in Ray Train workers)."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def _stdout_line(line: str) -> None:
    # Not print(): Ray Train patches print in workers and may emit each line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
