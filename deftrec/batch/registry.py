"""The baselines an evaluation can report, by name: the one place that knows all of them.

Kept apart from :mod:`deftrec.batch.baselines` (the non-neural models and the shared runner) so that
SASRec, which builds on that module, is imported only when a run asks for it (it needs torch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from deftrec.batch.baselines import BASELINES, Baseline
from deftrec.config.baselines import SASRecConfig

__all__ = ["baseline_factories", "build_baselines"]


def build_baselines(names: Sequence[str], sasrec: SASRecConfig | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Baseline]:
    """Unfitted baselines by name, in the given order: the non-neural ones with their defaults,
    ``"sasrec"`` as :class:`deftrec.batch.sasrec.SASRec` with config ``sasrec`` (default settings
    when None); ``log`` receives SASRec's progress lines."""
    out: dict[str, Any] = {}
    for name in names:
        if name == "sasrec":
            from deftrec.batch.sasrec import SASRec

            out[name] = SASRec(sasrec, log=log)
        elif name in BASELINES:
            out[name] = BASELINES[name]()
        else:
            raise ValueError(f"unknown baseline {name!r}; known: {sorted([*BASELINES, 'sasrec'])}")
    return out


def _build_one(name: str, sasrec: SASRecConfig | None) -> Baseline:
    """One baseline by name, built where it runs (SASRec's progress lines go to that process's stdout)."""
    return build_baselines([name], sasrec, log=print)[name]


def baseline_factories(names: Sequence[str], sasrec: SASRecConfig | None = None) -> dict[str, Callable[[], Baseline]]:
    """Factories of the baselines by name (checked now), for runs in other processes: a factory
    pickles where a built model holding a log writer may not."""
    unknown = [n for n in names if n != "sasrec" and n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {sorted([*BASELINES, 'sasrec'])}")
    return {name: functools.partial(_build_one, name, sasrec) for name in names}
