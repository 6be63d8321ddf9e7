"""Build the FAISS index over a run's item keys (Ray Data, actor pool): RUN_DIR/index.

    python -m pipelines.index --run-dir DIR [--config preset.yaml] [--factory "HNSW32,Flat"] [--force]
        [--set index.key=value ...] [--verbose]

The keys are the model export's item matrix (no LLM is loaded); the index ranks by the export's
``eval.score``. Settings: ``--config`` (default: the config ``pipelines.end_to_end`` recorded in DIR,
so the stage reproduces that run and is skipped when it is up to date), then ``--set``, then the flags.
Skipped when DIR/index is up to date for the same index config and model export (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import sys

from pipelines._cli import add_common_flags, run, stage_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.index", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add_argument("--factory", help='FAISS factory string: "Flat" (default), "HNSW32,Flat", "IVF1024,PQ16", ...')
    p.add_argument("--actors", type=int, default=1, help="item-key actors")
    p.add_argument("--force", action="store_true", help="rebuild even if the index is up to date")
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.batch.index_job import run_index_job

        cfg = stage_config(a, [f"index.factory={a.factory}"] if a.factory is not None else [])
        run_index_job(a.run_dir, cfg.index, force=a.force, actors=a.actors)
        return 0

    return run(a, body, "index")


if __name__ == "__main__":
    sys.exit(main())
