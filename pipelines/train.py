"""Fine-tune DeftRec as a Ray Train job with DeepSpeed ZeRO and export the best checkpoint to RUN_DIR/model.

    python -m pipelines.train --run-dir DIR --config preset.yaml [--num-workers N] [--use-gpu]
        [--zero-stage {0,2,3}] [--storage-path PATH] [--name NAME] [--max-failures N]
        [--debug-steps N] [--no-export] [--set key=value ...]

Needs DIR/data (``python -m pipelines.end_to_end``) and DIR/collab (``python -m pipelines.collab``).
Re-running the same command (same storage path and run name) resumes from the latest checkpoint;
a different ``--num-workers`` resumes from the consolidated weights (optimizer moments reset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines._cli import add_distributed_flags, distributed_overrides, run, stage_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    add_distributed_flags(p)
    p.add_argument("--zero-stage", type=int, choices=(0, 2, 3), help="DeepSpeed ZeRO stage (distributed.zero_stage)")
    p.add_argument("--debug-steps", type=int, help="stop after N optimizer steps (smoke run)")
    p.add_argument("--no-export", action="store_true", help="train and checkpoint only; do not write DIR/model")
    a = p.parse_args(argv)

    def body() -> int:
        from deftrec.training.driver import train_distributed

        overrides = distributed_overrides(a)
        if a.zero_stage is not None:
            overrides.append(f"distributed.zero_stage={a.zero_stage}")
        if a.debug_steps is not None:
            overrides.append(f"distributed.debug_steps={a.debug_steps}")
        cfg = stage_config(a, overrides)
        res = train_distributed(cfg.model, cfg.distributed, Path(a.run_dir), run_name=cfg.name,
                                export=not a.no_export)
        st = res.state
        print("\n== summary ==")
        print(f"run          {res.storage}")
        print(f"best         step {st.best_step} (valid NDCG@10 {st.best_score:.4f}) {res.best_checkpoint}")
        print(f"latest       {res.latest_checkpoint}")
        if res.model_dir is not None:
            print(f"model        {res.model_dir}")
        return 0

    return run(a, body, "train")


if __name__ == "__main__":
    sys.exit(main())
