"""Train the collaborative embeddings (LightGCN) as a Ray Train job and write RUN_DIR/collab.

    python -m pipelines.collab --run-dir DIR [--config preset.yaml] [--num-workers N] [--use-gpu]
        [--storage-path PATH] [--name NAME] [--set key=value ...] [--force]

Reads the preprocessed data in DIR/data (``python -m pipelines.end_to_end`` makes it). Skips the
job when DIR/collab is already complete for the same config and data (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deftrec.core.config import ConfigError
from deftrec.data.readers import InputError
from deftrec.core.artifacts import ArtifactError


def distributed_overrides(a: argparse.Namespace) -> list[str]:
    """CLI flags -> ``distributed.*`` overrides (flags win over the preset)."""
    out = list(a.set)
    for flag, key in (("num_workers", "num_workers"), ("storage_path", "storage_path"), ("name", "name"),
                      ("max_failures", "max_failures"), ("cpus_per_worker", "cpus_per_worker")):
        v = getattr(a, flag, None)
        if v is not None:
            out.append(f"distributed.{key}={v}")
    if getattr(a, "use_gpu", False):
        out.append("distributed.use_gpu=true")
    return out


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (data/ inside; outputs written next to it)")
    p.add_argument("--config", help="YAML preset, e.g. pipelines/configs/tiny.yaml (default: built-in defaults)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (distributed.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, help="logical CPUs reserved per worker")
    p.add_argument("--storage-path", help="Ray Train storage (default RUN_DIR/ray_results); s3://... works")
    p.add_argument("--name", help="Ray Train run name (default: the preset name); same name = resume")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.collab", description=__doc__.splitlines()[0])
    add_distributed_flags(p)
    p.add_argument("--force", action="store_true", help="retrain even if DIR/collab is up to date")
    a = p.parse_args(argv)
    from deftrec.artifacts.collab import collab_fingerprint
    from deftrec.training.collab_job import train_collab_distributed
    from deftrec.core.artifacts import is_complete, read_manifest
    from deftrec.config.pipeline import load_pipeline_config

    run_dir = Path(a.run_dir)
    out = run_dir / "collab"
    try:
        cfg = load_pipeline_config(a.config, distributed_overrides(a))
        fp = collab_fingerprint(cfg.collab, run_dir / "data")
        if not a.force and is_complete(out) and read_manifest(out).get("fingerprint") == fp:
            print(f"[collab] {out} is up to date (same config and data); --force retrains")
            return 0
        art = train_collab_distributed(cfg.collab, run_dir / "data", out, cfg.distributed,
                                       run_name=f"{cfg.name}-collab")
    except (ConfigError, InputError, ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\ncollab: U {art.user_emb.shape}, E {art.item_emb.shape}, best validation HR@10 {art.best_hr10} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
