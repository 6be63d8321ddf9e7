"""Train the collaborative embeddings (LightGCN) as a Ray Train job and write RUN_DIR/collab.

    python -m pipelines.collab --run-dir DIR [--config preset.yaml] [--num-workers N] [--use-gpu]
        [--storage-path PATH] [--name NAME] [--set key=value ...] [--force] [--verbose]

Reads the preprocessed data in DIR/data (``python -m pipelines.end_to_end`` makes it). Skips the
job when DIR/collab is already complete for the same config and data (``--force`` retrains);
``pipelines.end_to_end`` recognises the artifact by the same fingerprint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines._cli import add_distributed_flags, distributed_overrides, run, stage_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.collab", description=__doc__.splitlines()[0])
    add_distributed_flags(p)
    p.add_argument("--force", action="store_true", help="retrain even if DIR/collab is up to date")
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.artifacts.collab import collab_fingerprint
        from deftrec.core.artifacts import up_to_date
        from deftrec.training.collab_job import train_collab_distributed

        run_dir = Path(a.run_dir)
        out = run_dir / "collab"
        cfg = stage_config(a, distributed_overrides(a))
        if not a.force and up_to_date(out, collab_fingerprint(cfg.model.collab, run_dir / "data")):
            print(f"[collab] {out} is up to date (same config and data); --force retrains")
            return 0
        art = train_collab_distributed(cfg.model.collab, run_dir / "data", out, cfg.distributed,
                                       run_name=f"{cfg.name}-collab")
        print(f"\ncollab: U {art.user_emb.shape}, E {art.item_emb.shape}, best validation HR@10 {art.best_hr10} "
              f"-> {out}")
        return 0

    return run(a, body, "collab")


if __name__ == "__main__":
    sys.exit(main())
