"""Connecting to Ray the same way from a laptop, a test and a `ray job submit` entry point.

Imports only :mod:`deftrec.core.console` (a leaf helper of the same layer)."""

from __future__ import annotations

import os
import sys

from deftrec.core.console import is_verbose, quiet_ray_console, ray_logging_level


def ensure_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to the cluster given by RAY_ADDRESS (set by `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if quiet:
        kwargs["logging_level"] = ray_logging_level()
        if not is_verbose():
            quiet_ray_console()
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    configure_data_context()
    if not is_verbose():
        quiet_ray_console()


def configure_data_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Progress bars only where a person watches; in jobs and CI they drown the stage lines.
    ctx.enable_progress_bars = sys.stderr.isatty()
    # Pandas UDFs would otherwise see Arrow-backed dtypes (numpy ops on them are slow or fail).
    if hasattr(ctx, "enable_arrow_backed_pandas_conversion"):
        ctx.enable_arrow_backed_pandas_conversion = False
