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

__all__ = ["RAY_LOGGERS", "configure_console", "is_verbose", "quiet_ray_console", "ray_logging_level"]

#: Ray's loggers whose INFO records are kept off the console unless --verbose.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")

_state: dict = {"verbose": False, "log_file": None}

#: Environment of a quiet console, inherited by the Ray workers this process starts (an explicit
#: setting in the environment wins). Workers of an already running cluster apply the same through
#: :func:`deftrec.core.log.quiet_worker_logs`.
VERBOSE_ENV = "DEFTREC_VERBOSE"
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # "new embeddings will be initialized ..." and similar notes
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Loading weights" / "Writing model shards" bars
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
}


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


class _RunLogHandler(logging.StreamHandler):
    """Ray's records below WARNING, into the run's log file (never filtered by quiet_ray_console)."""


def _warning_and_up(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_ray_console() -> None:
    """Keep Ray's INFO records off the console handlers of Ray's loggers (file handlers keep them).

    Ray creates some handlers lazily (Ray Data when it first executes), so this runs again after
    Ray has started (:func:`deftrec.core.cluster.ensure_ray`)."""
    for name in RAY_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, (logging.FileHandler, _RunLogHandler)):
                if _warning_and_up not in h.filters:
                    h.addFilter(_warning_and_up)


def _quiet_environment() -> None:
    import warnings
    from importlib import resources

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    data_cfg = resources.files("deftrec") / "assets" / "ray_data_logging.yaml"
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(data_cfg))
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def is_verbose() -> bool:
    return _state["verbose"]


def ray_logging_level() -> str:
    """The level for ``ray.init``: INFO when a log file keeps Ray's INFO records (the console is
    filtered by :func:`quiet_ray_console`) or with ``--verbose``, else WARNING."""
    return "info" if (_state["verbose"] or _state["log_file"] is not None) else "warning"


def configure_console(verbose: bool = False, log_file: str | os.PathLike | None = None) -> None:
    """Set up the console for a command; with ``log_file``, keep a full copy of its output there."""
    _state["verbose"] = verbose
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        _quiet_environment()
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        _state["log_file"] = path
        f = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process
        sys.stdout = _Tee(sys.stdout, f)
        sys.stderr = _Tee(sys.stderr, f)
        handler = _RunLogHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        # WARNING and above reach the file through the console tee already
        handler.addFilter(lambda record: record.levelno < logging.WARNING)
        logging.getLogger("ray").addHandler(handler)
    if not verbose:
        quiet_ray_console()
