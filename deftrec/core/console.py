"""Console and log-file setup of an entry point: readable by default, everything on record.

The console shows the command's own progress lines and Ray's records from WARNING up; with
``--verbose`` Ray's INFO records (execution plans, controller lines) too. Everything the command
prints, and Ray's INFO records, is also appended to ``RUN_DIR/logs/<command>.log``. Imports no
other project module.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["RAY_LOGGERS", "configure_console", "is_verbose", "quiet_ray_console"]

#: Ray's loggers whose INFO records are kept off the console unless --verbose.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")

_state = {"verbose": False}


class _Tee:
    """A text stream that writes to the console stream and to a log file."""

    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _warning_and_up(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_ray_console() -> None:
    """Keep Ray's INFO records off the console handlers of Ray's loggers (file handlers keep them).

    Ray creates some handlers lazily (Ray Data when it first executes), so this runs again after
    Ray has started (:func:`deftrec.core.cluster.ensure_ray`)."""
    for name in RAY_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                if _warning_and_up not in h.filters:
                    h.addFilter(_warning_and_up)


def is_verbose() -> bool:
    return _state["verbose"]


def configure_console(verbose: bool = False, log_file: str | os.PathLike | None = None) -> None:
    """Set up the console for a command; with ``log_file``, keep a full copy of its output there."""
    _state["verbose"] = verbose
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process
        sys.stdout = _Tee(sys.stdout, f)
        sys.stderr = _Tee(sys.stderr, f)
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        # WARNING and above reach the file through the console tee already
        handler.addFilter(lambda record: record.levelno < logging.WARNING)
        logging.getLogger("ray").addHandler(handler)
    if not verbose:
        quiet_ray_console()
