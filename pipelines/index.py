"""Embed every item and build the FAISS index of a run (Ray Data, actor pool).

    python -m pipelines.index --run-dir DIR [--factory "HNSW32,Flat"] [--metric l2|ip] [--force]
"""

from __future__ import annotations

import argparse
import sys

from deftrec.core.config import ConfigError, apply_overrides, from_dict
from deftrec.config.jobs import IndexConfig
from deftrec.core.artifacts import ArtifactError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.index", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="run directory with data/ and model/")
    p.add_argument("--factory", help='FAISS factory string: "Flat" (default), "HNSW32,Flat", "IVF1024,PQ16", ...')
    p.add_argument("--metric", choices=["l2", "ip"])
    p.add_argument("--actors", type=int, default=1, help="embedding actors (model replicas)")
    p.add_argument("--force", action="store_true", help="rebuild even if the index is up to date")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other IndexConfig fields")
    a = p.parse_args(argv)
    from deftrec.batch.index_job import run_index_job

    try:
        data = {k: v for k, v in {"factory": a.factory, "metric": a.metric}.items() if v is not None}
        cfg = from_dict(IndexConfig, apply_overrides(data, a.set), "index")
        run_index_job(a.run_dir, cfg, force=a.force, actors=a.actors)
    except (ConfigError, ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
