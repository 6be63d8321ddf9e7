"""What every entry point shares: the common flags, console/log-file setup and the error tail.

Each ``pipelines.<stage>`` module is argparse -> config -> one library call inside :func:`run`.
A :class:`~deftrec.core.errors.UserError` (a bad config value, input file or artifact:
``ConfigError``, ``InputError``, ``ArtifactError`` and their subclasses) ends the command with
its message as one ``error:`` line on stderr and exit code 2, no traceback. Anything else, a plain
``ValueError`` included, is a bug: it propagates with its traceback (Python's exit code 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from deftrec.core.console import configure_console
from deftrec.core.errors import UserError

#: Errors that are the user's to fix: printed as one line, exit code 2. Only the user-error types:
#: a ValueError from a failed internal check is a bug and must keep its traceback.
USER_ERRORS = (UserError,)


def add_common_flags(p: argparse.ArgumentParser, run_dir: bool = True, config: bool = True) -> None:
    """``--run-dir``, ``--config``, ``--set KEY=VALUE`` (repeatable) and ``--verbose``."""
    if run_dir:
        p.add_argument("--run-dir", required=True, help="run directory (data/ inside; outputs written next to it)")
    if config:
        p.add_argument("--config", help="YAML preset, e.g. pipelines/configs/tiny.yaml (default: the config "
                       "pipelines.end_to_end recorded in the run directory, else the built-in defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--verbose", action="store_true", help="show Ray's own INFO logs on the console too")


def stage_config(a: argparse.Namespace, overrides: list[str] | None = None):
    """The stage's :class:`~deftrec.config.pipeline.PipelineConfig`: ``--config`` (or the config recorded
    in ``--run-dir``, or the defaults) with ``--set`` and then ``overrides`` (flags) applied."""
    from deftrec.config.pipeline import load_run_config

    return load_run_config(getattr(a, "run_dir", None), a.config, [*a.set, *(overrides or [])])


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """The Ray Train flags of the collab and train jobs (each maps to a ``distributed.*`` field)."""
    add_common_flags(p)
    p.add_argument("--num-workers", type=int, help="Ray Train workers (distributed.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, help="logical CPUs reserved per worker")
    p.add_argument("--storage-path", help="Ray Train storage (default RUN_DIR/ray_results); s3://... works")
    p.add_argument("--name", help="Ray Train run name (default: the preset name); same name = resume")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint")


def distributed_overrides(a: argparse.Namespace) -> list[str]:
    """CLI flags -> ``distributed.*`` overrides (flags win over the preset)."""
    out = []
    for flag in ("num_workers", "storage_path", "name", "max_failures", "cpus_per_worker"):
        v = getattr(a, flag, None)
        if v is not None:
            out.append(f"distributed.{flag}={v}")
    if getattr(a, "use_gpu", False):
        out.append("distributed.use_gpu=true")
    return out


def run(a: argparse.Namespace, body: Callable[[], int | None], log_name: str) -> int:
    """Set up the console (Ray's logs at WARNING unless ``--verbose``; everything, Ray's INFO logs
    included, also in ``RUN_DIR/logs/<log_name>.log`` when the command has a run directory), run
    ``body`` and turn user errors into exit code 2 (every other exception propagates)."""
    run_dir = getattr(a, "run_dir", None)
    log_file = Path(run_dir) / "logs" / f"{log_name}.log" if run_dir else None
    configure_console(verbose=getattr(a, "verbose", False), log_file=log_file)
    try:
        return body() or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
