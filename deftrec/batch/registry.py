"""The baselines an evaluation can report, by name: the one place that knows all of them.

Kept apart from :mod:`deftrec.batch.baselines` (the non-neural models and the shared runner) so that
SASRec, which builds on that module, is imported only when a run asks for it (it needs torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from deftrec.batch.baselines import BASELINES, Baseline
from deftrec.config.baselines import SASRecConfig

__all__ = ["build_baselines"]


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
