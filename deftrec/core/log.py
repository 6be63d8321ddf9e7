"""Progress output: one readable line per event, written once (rank 0 in Ray Train workers).

Line writers (:data:`Log`): :func:`writer` (a job's ``log=`` argument, None = silent) and
:func:`rank_zero` (Ray Train workers: rank 0 writes, the others are silent), and
:func:`quiet_worker_logs` for Ray Train workers. The entry points' console and log-file
set-up is :mod:`deftrec.core.console`. This module imports no other project module.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

Log = Callable[[str], None]


def _stdout_line(line: str) -> None:
    # Not print(): Ray Train patches print in workers and may emit each line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _discard(line: str) -> None:
    pass


def writer(log: Log | None) -> Log:
    """``log``, or a writer that drops every line when it is None (the ``log=None`` of the jobs)."""
    return log if log is not None else _discard


def rank_zero(rank: int) -> Log:
    """The line writer of a Ray Train worker: stdout on rank 0, nothing on the others (one line per event)."""
    return _stdout_line if rank == 0 else _discard


def quiet_ray_train_reports() -> None:
    """Stop a Ray Train worker from logging every ``ray.train.report`` as a raw ``TrainingReport(...)``.

    Ray Train V2 (2.5x, 2.60) logs "Reporting training result N: TrainingReport(checkpoint=...,
    metrics={...every metric...}) from rank R" at INFO on every rank. Its logger is named after its
    source file (``logging.getLogger(__file__)`` in ``ray/train/v2/_internal/execution/context.py``), not
    ``ray.train.*``, so ``RunConfig(logging_config=LoggingConfig(log_level=...))``, which filters only
    ``ray.train.*`` records, does not reach it; it propagates to the worker's root logger (INFO, console).
    Raising that one logger to WARNING keeps its warnings; the reported metrics still reach the Result.
    Call it in the worker (the logger lives there), before the first report.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # Train V1, or another layout: nothing of the kind to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_worker_logs() -> None:
    """Worker-side console hygiene: Ray Train's per-report records always, and unless the command
    runs with ``--verbose`` (``DEFTREC_VERBOSE=1``) library warnings and notes too, so a worker prints
    only its progress lines. Call it first thing in a Ray Train worker."""
    import os
    import warnings

    quiet_ray_train_reports()
    if os.environ.get("DEFTREC_VERBOSE") == "1":
        return
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
