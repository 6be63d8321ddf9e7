"""Batch evaluation of a run on Ray Data: recommendations, metrics against baselines, report.

    python -m pipelines.evaluate --run-dir DIR [--config preset.yaml] [--split test|valid] [--limit N]
        [--sampler ddpm|ddim] [--steps S] [--batch-size B] [--actors A] [--baselines a,b] [--force]
        [--set evaluate.key=value ...] [--verbose]

Settings: ``--config`` (default: the config ``pipelines.end_to_end`` recorded in DIR, so the stage
reproduces that run's numbers and is skipped when it is up to date), then ``--set``, then the flags.
Skipped when DIR/eval is up to date for the same settings, data, model and index (``--force``
re-evaluates).
"""

from __future__ import annotations

import argparse
import sys

from pipelines._cli import add_common_flags, run, stage_config

#: flag -> ``evaluate.*`` field; a flag left out keeps the config's value.
_FLAGS = ("split", "limit", "sampler", "steps", "seed", "batch_size", "actors", "baselines")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add_argument("--split", choices=["test", "valid"])
    p.add_argument("--limit", type=int, help="first N users of the split")
    p.add_argument("--sampler", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--explain", action="store_true", help="also generate the reasoning text")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--actors", type=int)
    p.add_argument("--baselines", help="comma-separated baselines beside DeftRec (default: popularity,markov,"
                   "ease,sasrec)")
    p.add_argument("--force", action="store_true", help="re-evaluate even if DIR/eval is up to date")
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.batch.evaluate import run_evaluation
        from deftrec.batch.report import format_table

        flags = [f"evaluate.{k}={getattr(a, k)}" for k in _FLAGS if getattr(a, k) is not None]
        if a.explain:
            flags.append("evaluate.explain=true")
        cfg = stage_config(a, flags)
        m = run_evaluation(a.run_dir, cfg.evaluate, force=a.force)
        print(format_table(m))
        print(f"[evaluate] wrote {a.run_dir}/eval (metrics.json, recs.parquet, report.md, report.png); "
              f"{m['seconds']['total']:.1f}s")
        return 0

    return run(a, body, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
