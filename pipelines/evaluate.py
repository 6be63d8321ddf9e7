"""Batch evaluation of a run on Ray Data: recommendations, metrics against baselines, report.

    python -m pipelines.evaluate --run-dir DIR [--split test|valid] [--limit N] [--sampler ddpm|ddim] [--steps S]
        [--force] [--verbose]

Skipped when DIR/eval is up to date for the same settings, data, model and index (``--force``
re-evaluates).
"""

from __future__ import annotations

import argparse
import sys

from pipelines._cli import add_common_flags, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0])
    add_common_flags(p, config=False)
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--limit", type=int, help="first N users of the split")
    p.add_argument("--sampler", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--explain", action="store_true", help="also generate the reasoning text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--baselines", help="comma-separated baselines beside DeftRec (default: popularity,markov,"
                   "ease,sasrec)")
    p.add_argument("--force", action="store_true", help="re-evaluate even if DIR/eval is up to date")
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.batch.evaluate import run_evaluation
        from deftrec.batch.report import format_table
        from deftrec.config.jobs import EvaluateJobConfig
        from deftrec.core.config import from_dict

        cfg = from_dict(EvaluateJobConfig, {k: v for k, v in {
            "split": a.split, "limit": a.limit, "sampler": a.sampler, "steps": a.steps, "seed": a.seed,
            "explain": a.explain, "batch_size": a.batch_size, "actors": a.actors,
            "baselines": a.baselines}.items() if v is not None}, "evaluate")
        m = run_evaluation(a.run_dir, cfg, force=a.force)
        print(format_table(m))
        print(f"[evaluate] wrote {a.run_dir}/eval (metrics.json, recs.parquet, report.md, report.png); "
              f"{m['seconds']['total']:.1f}s")
        return 0

    return run(a, body, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
