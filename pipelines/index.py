"""Build the FAISS index over a run's item keys (Ray Data, actor pool): RUN_DIR/index.

    python -m pipelines.index --run-dir DIR [--factory "HNSW32,Flat"] [--metric l2|ip] [--force] [--verbose]

The keys are the model export's item matrix (no LLM is loaded). Skipped when DIR/index is up to
date for the same index config and model export (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import sys

from pipelines._cli import add_common_flags, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.index", description=__doc__.splitlines()[0])
    add_common_flags(p, config=False)
    p.add_argument("--factory", help='FAISS factory string: "Flat" (default), "HNSW32,Flat", "IVF1024,PQ16", ...')
    p.add_argument("--metric", choices=["l2", "ip"])
    p.add_argument("--actors", type=int, default=1, help="item-key actors")
    p.add_argument("--force", action="store_true", help="rebuild even if the index is up to date")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other IndexConfig fields")
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.batch.index_job import run_index_job
        from deftrec.config.jobs import IndexConfig
        from deftrec.core.config import apply_overrides, from_dict

        data = {k: v for k, v in {"factory": a.factory, "metric": a.metric}.items() if v is not None}
        cfg = from_dict(IndexConfig, apply_overrides(data, a.set), "index")
        run_index_job(a.run_dir, cfg, force=a.force, actors=a.actors)
        return 0

    return run(a, body, "index")


if __name__ == "__main__":
    sys.exit(main())
