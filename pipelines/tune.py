"""Let validation choose the settings: a Ray Tune search over the training job, the best trial exported.

    python -m pipelines.tune --run-dir DIR [--config preset.yaml] [--set 'tune.space={train.lr: [0.001, 0.005]}']
        [--num-workers N] [--use-gpu] [--verbose]

Needs DIR/data and DIR/collab. Each trial is the pipeline's own training job (``pipelines.train``)
with one point of ``tune.space`` applied, stopped early by ASHA on validation NDCG@10; every trial's
result is written to DIR/tune/trials.json, the choice to DIR/tune/manifest.json, and the best trial's
best checkpoint is exported to DIR/model (its settings in the model's config). In
``pipelines.end_to_end`` the same search is the stage ``tune``, before ``train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines._cli import add_distributed_flags, distributed_overrides, run, stage_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.tune", description=__doc__.splitlines()[0])
    add_distributed_flags(p)
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.core.config import ConfigError
        from deftrec.training.driver import train_distributed
        from deftrec.training.tune_job import run_tune, tuned_training

        cfg = stage_config(a, distributed_overrides(a))
        if not cfg.tune.space:
            raise ConfigError("tune.space is empty: name the model fields to search, e.g. "
                              "--set 'tune.space={train.lr: [0.001, 0.005]}'")
        run_dir = Path(a.run_dir)
        m = run_tune(cfg.model, cfg.distributed, cfg.tune, run_dir, run_name=cfg.name)
        model, dist = tuned_training(cfg.model, cfg.distributed, run_dir)
        res = train_distributed(model, dist, run_dir, run_name=cfg.name)
        print(f"\nbest trial {m['best']['trial']} {m['best']['overrides']}: valid NDCG@10 "
              f"{m['best']['valid_ndcg@10']:.4f}; exported to {res.model_dir}; every trial in {run_dir}/tune/trials.json")
        return 0

    return run(a, body, "tune")


if __name__ == "__main__":
    sys.exit(main())
